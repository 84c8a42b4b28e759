"""Procedurally rendered faces with known identity, landmarks and box.

They stand in for MS-Celeb-1M / VGGFace2, which cannot be downloaded here. An identity is a
fixed parameter vector (face shape, skin, eyes, brows, nose, mouth, hair, marks, beard,
glasses); every image of it adds nuisance (pose, scale, position, a little yaw, expression,
light, colour cast, blur, noise, background clutter, JPEG quality). The five landmarks
(image-left eye, image-right eye, nose tip, left and right mouth corner) are exact, because
the face is drawn from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

CANVAS = 256  # the face is drawn upright in this frame, then warped into the image
EYE_Y = 112.0


@dataclass(frozen=True)
class Identity:
    eye_dist: float
    face_w: float  # half-width / eye distance
    face_h: float  # half-height / eye distance
    jaw: float  # 0 round .. 1 narrow chin
    skin: tuple[float, float, float]
    eye_w: float
    eye_h: float
    iris: tuple[float, float, float]
    brow_thick: int
    brow_raise: float
    brow_slant: float
    brow_color: tuple[float, float, float]
    nose_len: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip: float
    lip_color: tuple[float, float, float]
    hair_color: tuple[float, float, float]
    hair_style: int  # 0 short, 1 long, 2 bald, 3 fringe
    hairline: float
    mole: tuple[float, float] | None
    beard: bool
    glasses: bool


def random_identity(rng: np.random.Generator) -> Identity:
    skin_base = np.array([[140, 170, 220], [110, 150, 200], [80, 120, 170], [65, 100, 145], [150, 185, 235]])
    # brightness varies freely, hue only a little (no green or blue skin)
    skin = skin_base[rng.integers(len(skin_base))] * rng.uniform(0.85, 1.1) * rng.uniform(0.96, 1.04, 3)
    hair = np.array([[20, 20, 25], [30, 50, 90], [60, 110, 170], [150, 150, 150], [20, 40, 60], [90, 160, 220]])
    return Identity(
        eye_dist=float(rng.uniform(56, 70)),
        face_w=float(rng.uniform(0.95, 1.25)),
        face_h=float(rng.uniform(1.3, 1.6)),
        jaw=float(rng.uniform(0, 1)),
        skin=tuple(np.clip(skin, 0, 255).tolist()),
        eye_w=float(rng.uniform(0.17, 0.25)),
        eye_h=float(rng.uniform(0.07, 0.11)),
        iris=tuple(rng.choice([[60, 40, 20], [120, 90, 40], [30, 60, 100], [90, 120, 60], [20, 20, 30]]).tolist()),
        brow_thick=int(rng.integers(4, 8)),
        brow_raise=float(rng.uniform(0.22, 0.38)),
        brow_slant=float(rng.uniform(-0.12, 0.12)),
        brow_color=tuple(np.minimum(hair[rng.integers(len(hair))] * 0.5, 70).tolist()),
        nose_len=float(rng.uniform(0.5, 0.65)),
        nose_w=float(rng.uniform(0.14, 0.24)),
        mouth_y=float(rng.uniform(1.05, 1.25)),
        mouth_w=float(rng.uniform(0.36, 0.5)),
        lip=float(rng.uniform(0.05, 0.11)),
        lip_color=tuple((np.array([90, 90, 180]) * rng.uniform(0.7, 1.1, 3)).tolist()),
        hair_color=tuple(hair[rng.integers(len(hair))].tolist()),
        hair_style=int(rng.integers(4)),
        hairline=float(rng.uniform(0.55, 0.85)),
        mole=(float(rng.uniform(-0.8, 0.8)), float(rng.uniform(0.2, 1.2))) if rng.random() < 0.4 else None,
        beard=bool(rng.random() < 0.25),
        glasses=bool(rng.random() < 0.12),
    )


@dataclass(frozen=True)
class Nuisance:
    angle_deg: float
    eye_px: float  # eye distance in the output image, pixels
    centre: tuple[float, float]  # where the face centre lands, pixels
    yaw: float
    expression: float
    light: float
    light_dir: float
    cast: tuple[float, float, float]
    blur_sigma: float
    noise_sigma: float
    jpeg_quality: int


def random_nuisance(rng: np.random.Generator, size: int, eye_px: tuple[float, float] = (26, 44),
                    blur: tuple[float, float] = (0.0, 1.0)) -> Nuisance:
    eye = float(rng.uniform(*eye_px))
    margin = min(0.5 * size, 2.2 * eye)  # keep the whole face inside the frame
    return Nuisance(
        angle_deg=float(rng.uniform(-20, 20)),
        eye_px=eye,
        centre=(float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin))),
        yaw=float(rng.uniform(-0.25, 0.25)),
        expression=float(rng.uniform(0, 1)),
        light=float(rng.uniform(0, 0.35)),
        light_dir=float(rng.uniform(0, 2 * np.pi)),
        cast=tuple(rng.uniform(0.9, 1.1, 3).tolist()),
        blur_sigma=float(rng.uniform(*blur)),
        noise_sigma=float(rng.uniform(0, 5)),
        jpeg_quality=int(rng.integers(60, 96)),
    )


def _pt(x: float, y: float) -> tuple[int, int]:
    # cv2 drawing with 4 fractional bits for sub-pixel accuracy
    return int(round(x * 16)), int(round(y * 16))


def _ellipse(img, centre, axes, angle, color, thickness=-1):
    cv2.ellipse(img, _pt(*centre), _pt(*axes), angle, 0, 360, color, thickness, cv2.LINE_AA, 4)


def draw_face(ident: Identity, yaw: float, expression: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw the face upright on a CANVAS x CANVAS BGRA canvas.

    Returns (canvas float32 BGR, alpha float32 in [0, 1], landmarks (5, 2) canvas coords).
    """
    d = ident.eye_dist
    cx = CANVAS / 2
    shift = yaw * d * 0.45  # inner features move with the head's yaw
    face_c = (cx + 0.3 * shift, EYE_Y + 0.45 * d)
    fw, fh = ident.face_w * d * (1 - 0.15 * abs(yaw)), ident.face_h * d
    skin = ident.skin
    bgr = np.zeros((CANVAS, CANVAS, 3), np.uint8)
    alpha = np.zeros((CANVAS, CANVAS), np.uint8)

    # Neck, long hair behind the head, then the face itself.
    neck = np.array([[face_c[0] - 0.5 * fw, face_c[1] + 0.6 * fh], [face_c[0] + 0.5 * fw, face_c[1] + 0.6 * fh],
                     [face_c[0] + 0.6 * fw, CANVAS], [face_c[0] - 0.6 * fw, CANVAS]])
    neck_color = tuple(c * 0.8 for c in skin)
    cv2.fillPoly(bgr, [np.round(neck * 16).astype(np.int32)], neck_color, cv2.LINE_AA, 4)
    cv2.fillPoly(alpha, [np.round(neck * 16).astype(np.int32)], 255, cv2.LINE_AA, 4)
    if ident.hair_style == 1:
        _ellipse(bgr, (face_c[0], face_c[1] + 0.1 * fh), (fw * 1.25, fh * 1.15), 0, ident.hair_color)
        _ellipse(alpha, (face_c[0], face_c[1] + 0.1 * fh), (fw * 1.25, fh * 1.15), 0, 255)
    # Face: an ellipse whose lower half narrows towards the chin by `jaw`.
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    xs, ys = np.cos(t), np.sin(t)
    narrow = 1 - 0.25 * ident.jaw * np.clip(ys, 0, 1) ** 2
    outline = np.stack([face_c[0] + fw * xs * narrow, face_c[1] + fh * ys], 1)
    poly = [np.round(outline * 16).astype(np.int32)]
    cv2.fillPoly(bgr, poly, skin, cv2.LINE_AA, 4)
    cv2.fillPoly(alpha, poly, 255, cv2.LINE_AA, 4)
    # Ears
    for side in (-1, 1):
        ex = face_c[0] + side * fw * 0.97
        _ellipse(bgr, (ex, EYE_Y + 0.35 * d), (0.13 * d, 0.3 * d), 0, tuple(c * 0.9 for c in skin))
        _ellipse(alpha, (ex, EYE_Y + 0.35 * d), (0.13 * d, 0.3 * d), 0, 255)

    # Hair on top (skipped for bald), clipped to above the hairline.
    if ident.hair_style != 2:
        hair_mask = np.zeros((CANVAS, CANVAS), np.uint8)
        _ellipse(hair_mask, (face_c[0], face_c[1] - 0.08 * fh), (fw * 1.07, fh * 1.02), 0, 255)
        top = int(EYE_Y - ident.hairline * d)
        if ident.hair_style == 3:  # fringe comes lower on one side
            ramp = np.linspace(0, 0.25 * d, CANVAS)[None, :].astype(int)
            rows = np.arange(CANVAS)[:, None]
            hair_mask[rows > top + ramp] = 0
        else:
            hair_mask[top:] = 0
        bgr[hair_mask > 0] = ident.hair_color
        alpha[hair_mask > 0] = 255

    # Landmarks: eyes, nose tip, mouth corners (yaw shifts the inner face).
    smile = 0.06 * d * expression
    lm = np.array([
        [cx - d / 2 + shift, EYE_Y],
        [cx + d / 2 + shift, EYE_Y],
        [cx + 1.25 * shift, EYE_Y + ident.nose_len * d],
        [cx - ident.mouth_w * d + shift, EYE_Y + ident.mouth_y * d - smile],
        [cx + ident.mouth_w * d + shift, EYE_Y + ident.mouth_y * d - smile],
    ])

    # Brows
    for i, side in enumerate((-1, 1)):
        ex, ey = lm[i]
        inner = (ex - side * 0.2 * d, ey - ident.brow_raise * d + side * 0 - ident.brow_slant * d)
        outer = (ex + side * 0.25 * d, ey - ident.brow_raise * d + ident.brow_slant * d)
        cv2.line(bgr, _pt(*inner), _pt(*outer), ident.brow_color, ident.brow_thick, cv2.LINE_AA, 4)
    # Eyes: sclera, iris, pupil, upper lid; the far eye narrows with yaw.
    for i, side in enumerate((-1, 1)):
        ex, ey = lm[i]
        squeeze = 1 - 0.6 * max(0.0, side * yaw)
        ew, eh = ident.eye_w * d * squeeze, ident.eye_h * d
        _ellipse(bgr, (ex, ey), (ew, eh), 0, (235, 235, 235))
        _ellipse(bgr, (ex, ey), (eh * 0.95, eh * 0.95), 0, ident.iris)
        _ellipse(bgr, (ex, ey), (eh * 0.45, eh * 0.45), 0, (10, 10, 10))
        cv2.ellipse(bgr, _pt(ex, ey), _pt(ew, eh * 1.1), 0, 180, 360, (30, 30, 30), 2, cv2.LINE_AA, 4)
        if ident.glasses:
            _ellipse(bgr, (ex, ey), (0.32 * d, 0.24 * d), 0, (70, 70, 70), 1)
    if ident.glasses:
        cv2.line(bgr, _pt(lm[0][0] + 0.32 * d, lm[0][1]), _pt(lm[1][0] - 0.32 * d, lm[1][1]), (70, 70, 70), 1,
                 cv2.LINE_AA, 4)
    # Nose: shaded bridge side and nostrils.
    nx, ny = lm[2]
    shade = tuple(c * 0.72 for c in skin)
    side = 1 if yaw >= 0 else -1
    cv2.line(bgr, _pt(cx + shift * 0.8 + side * 0.1 * d, EYE_Y + 0.1 * d), _pt(nx + side * 0.1 * d, ny - 0.05 * d),
             shade, 3, cv2.LINE_AA, 4)
    for s in (-1, 1):
        _ellipse(bgr, (nx + s * ident.nose_w * d * 0.6, ny + 0.04 * d), (0.06 * d, 0.035 * d), 0, (40, 40, 60))
    # Mouth: lips with a dark line, corners exactly at the landmarks.
    ml, mr = lm[3], lm[4]
    mid_y = (ml[1] + mr[1]) / 2 + smile * 1.5
    lip_h = ident.lip * d * (1 + 0.5 * expression)
    upper = np.array([ml, [(ml[0] + mr[0]) / 2, mid_y - lip_h], mr])
    lower = np.array([mr, [(ml[0] + mr[0]) / 2, mid_y + lip_h * 1.3], ml])
    lips = np.concatenate([upper, lower])
    cv2.fillPoly(bgr, [np.round(lips * 16).astype(np.int32)], ident.lip_color, cv2.LINE_AA, 4)
    line = np.array([ml, [(ml[0] + mr[0]) / 2, mid_y], mr])
    cv2.polylines(bgr, [np.round(line * 16).astype(np.int32)], False, (30, 20, 40), 2, cv2.LINE_AA, 4)
    if ident.beard:
        beard = np.zeros((CANVAS, CANVAS), np.uint8)
        cv2.fillPoly(beard, poly, 255, cv2.LINE_AA, 4)
        beard[: int(mid_y + lip_h * 1.5)] = 0  # chin and jaw only, below the lips
        soft = cv2.GaussianBlur(beard, (0, 0), 0.08 * d).astype(np.float32)[..., None] / 255.0 * 0.45
        bgr[:] = (bgr * (1 - soft) + np.array(ident.hair_color, np.float32) * soft).astype(np.uint8)
    if ident.mole is not None:
        mx, my = ident.mole
        _ellipse(bgr, (cx + mx * d * 0.6 + shift, EYE_Y + my * d * 0.6), (2.2, 2.2), 0, (30, 40, 60))

    # Soft shading: darker towards the face border, as a lit sphere would be.
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32)
    r = np.sqrt(((xx - face_c[0]) / (fw * 1.1)) ** 2 + ((yy - face_c[1]) / (fh * 1.1)) ** 2)
    shading = 1.0 - 0.25 * np.clip(r, 0, 1) ** 2
    out = cv2.GaussianBlur(bgr, (0, 0), 0.8).astype(np.float32) * shading[..., None]
    return out, alpha.astype(np.float32) / 255.0, lm


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth gradient plus random clutter (shapes, lines, texture)."""
    c0, c1 = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    t = np.linspace(0, 1, size, dtype=np.float32)
    ramp = t[None, :, None] if rng.random() < 0.5 else t[:, None, None]
    img = (c0 * (1 - ramp) + c1 * ramp) * np.ones((size, size, 1), np.float32)
    img = img.astype(np.uint8)
    for _ in range(int(rng.integers(3, 10))):
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        p = rng.integers(0, size, 2)
        if kind == 0:
            q = p + rng.integers(10, size // 2, 2)
            cv2.rectangle(img, tuple(int(v) for v in p), tuple(int(v) for v in q), color, -1)
        elif kind == 1:
            cv2.circle(img, tuple(int(v) for v in p), int(rng.integers(5, size // 5)), color, -1, cv2.LINE_AA)
        else:
            q = rng.integers(0, size, 2)
            cv2.line(img, tuple(int(v) for v in p), tuple(int(v) for v in q), color, int(rng.integers(1, 6)),
                     cv2.LINE_AA)
    texture = cv2.resize(rng.normal(0, 12, (size // 8, size // 8, 3)).astype(np.float32), (size, size))
    return np.clip(cv2.GaussianBlur(img, (0, 0), 1.5).astype(np.float32) + texture, 0, 255)


def face_transform(nz: Nuisance, ident: Identity) -> np.ndarray:
    """2x3 matrix from the canvas frame to the output image (rotation, scale, translation)."""
    scale = nz.eye_px / ident.eye_dist
    a = np.deg2rad(nz.angle_deg)
    rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    anchor = np.array([CANVAS / 2, EYE_Y + 0.45 * ident.eye_dist])
    return np.hstack([rot, (np.array(nz.centre) - rot @ anchor)[:, None]])


def finish(img: np.ndarray, nz: Nuisance, rng: np.random.Generator) -> np.ndarray:
    """Light, colour cast, blur and sensor noise on a float image; returns uint8."""
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    light = 1 + nz.light * (np.cos(nz.light_dir) * xx + np.sin(nz.light_dir) * yy) * 2
    img = img * light[..., None] * np.array(nz.cast, np.float32)
    if nz.blur_sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), nz.blur_sigma)
    img = img + rng.normal(0, nz.noise_sigma, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


@dataclass
class Rendered:
    image: np.ndarray  # uint8 BGR
    landmarks: np.ndarray | None  # (5, 2) in image pixels
    box: np.ndarray | None  # tight face box x, y, w, h
    jpeg_quality: int


def render(ident: Identity | None, rng: np.random.Generator, size: int = 250,
           eye_px: tuple[float, float] = (26, 44), blur: tuple[float, float] = (0.0, 1.0)) -> Rendered:
    """One photo of `ident` (or, with None, a photo with no face in it)."""
    img = background(rng, size)
    nz = random_nuisance(rng, size, eye_px=eye_px, blur=blur)
    if ident is None:
        return Rendered(finish(img, nz, rng), None, None, nz.jpeg_quality)
    face, alpha, lm = draw_face(ident, nz.yaw, nz.expression)
    matrix = face_transform(nz, ident)
    warped = cv2.warpAffine(face, matrix, (size, size), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(alpha, matrix, (size, size), flags=cv2.INTER_LINEAR)[..., None]
    img = warped * mask + img * (1 - mask)
    landmarks = lm @ matrix[:, :2].T + matrix[:, 2]
    # Tight box: the transformed face outline (chin to hairline, ear to ear).
    d = ident.eye_dist
    corners = np.array([[CANVAS / 2 - ident.face_w * d, EYE_Y - 0.9 * d], [CANVAS / 2 + ident.face_w * d, EYE_Y - 0.9 * d],
                        [CANVAS / 2 - ident.face_w * d, EYE_Y + 0.45 * d + ident.face_h * d],
                        [CANVAS / 2 + ident.face_w * d, EYE_Y + 0.45 * d + ident.face_h * d]])
    pts = corners @ matrix[:, :2].T + matrix[:, 2]
    lo, hi = np.clip(pts.min(0), 0, size), np.clip(pts.max(0), 0, size)
    box = np.array([lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]])
    return Rendered(finish(img, nz, rng), landmarks, box, nz.jpeg_quality)
