"""MTCNN face detector (Zhang et al. 2016): P-Net proposals, R-Net refinement, O-Net landmarks.

Our own network code and cascade; the pretrained weights are the MIT-licensed ones that
ship in the facenet-pytorch 2.6.0 wheel (`make setup` fetches them into the cache; see
`cleaning.detect.weights`). Their state-dict layout is the one these modules declare.

The cascade follows facenet-pytorch 2.6.0's `detect_face` arithmetic step by step, so that
with the same weights our detections equal that reference to float tolerance (checked by
tests/test_mtcnn_reference.py against figures made by benchmarks/make_mtcnn_reference.py):
boxes stay float between the stages (no rounding before a regression or the landmark
decoding); P-Net's regression scales by x2 - x1, R-Net's and O-Net's by x2 - x1 + 1; the
candidate crops are cut the reference's way (truncated, clipped to the image, never padded)
and resampled with area interpolation (PyTorch's adaptive average pooling, reproduced
bit for bit); the first two NMS passes use torchvision's overlap (continuous box widths),
the last one the original MTCNN's pixel-inclusive intersection over the smaller box.
Detections come by descending score (the reference sorts them by box area).

Throughput choices (ours, not the reference's): every image of a batch with the same size
runs through each pyramid scale in one P-Net call; R-Net and O-Net see all candidate crops
of the batch at once, each crop cut from a summed-area table of its image (no Python loop
over boxes); NMS is a vectorised fixed-point iteration; everything runs on the detector's
device (CPU or GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class PNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), F.softmax(self.conv4_1(x), dim=1)


def _caffe_flatten(x: torch.Tensor) -> torch.Tensor:
    # The weights were converted from Caffe, whose dense layers read (C, W, H) order.
    return x.permute(0, 3, 2, 1).contiguous().flatten(1)


class RNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu4(self.dense4(_caffe_flatten(self.prelu3(self.conv3(x)))))
        return self.dense5_2(x), F.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu5(self.dense5(_caffe_flatten(self.prelu4(self.conv4(x)))))
        return self.dense6_2(x), self.dense6_3(x), F.softmax(self.dense6_1(x), dim=1)


# -- box utilities (all tensors, no Python loops over boxes) --------------------------------

def box_overlap(boxes: torch.Tensor, mode: str = "union", inclusive: bool = False,
                other: torch.Tensor | None = None) -> torch.Tensor:
    """Overlaps of `boxes` (rows) with `other` (columns; default `boxes`).

    'union': intersection over union; 'min': intersection over the smaller box. With
    `inclusive` a box spans x2 - x1 + 1 pixels (the original MTCNN's numpy NMS), otherwise
    x2 - x1 (torchvision.ops.nms). The operations are in the reference's order, so the
    float32 results are the same.
    """
    other = boxes if other is None else other
    x1, y1, x2, y2 = boxes.unbind(1)
    u1, v1, u2, v2 = other.unbind(1)
    one = 1 if inclusive else 0
    area = (x2 - x1 + one) * (y2 - y1 + one)
    area_o = (u2 - u1 + one) * (v2 - v1 + one)
    w = (torch.minimum(x2[:, None], u2[None]) - torch.maximum(x1[:, None], u1[None]) + one).clamp_min(0)
    h = (torch.minimum(y2[:, None], v2[None]) - torch.maximum(y1[:, None], v1[None]) + one).clamp_min(0)
    inter = w * h
    # Degenerate boxes (zero area) give 0 here where torchvision gets NaN: neither suppresses.
    if mode == "min":
        return inter / torch.minimum(area[:, None], area_o[None]).clamp_min(1e-9)
    return inter / (area[:, None] + area_o[None] - inter).clamp_min(1e-9)


def _nms_one(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, mode: str, inclusive: bool,
             chunk: int) -> torch.Tensor:
    # Exact ties in score go to the earlier candidate (a stable sort), on every device. The
    # reference's sorts leave their order unspecified; the reference photos have no ties.
    order = torch.sort(scores, descending=True, stable=True).indices
    kept_idx, kept_boxes = [], boxes[:0]
    # Greedy NMS never lets a box affect higher-scored ones, so the candidates can be taken
    # `chunk` at a time in score order: a chunk first loses what the boxes kept so far
    # suppress, then settles among itself. Exact, and the overlap matrix stays chunk x chunk
    # (P-Net on a large photo proposes tens of thousands of candidates).
    for start in range(0, len(order), chunk):
        head = order[start:start + chunk]
        b = boxes[head]
        if len(kept_boxes):
            alive = ~(box_overlap(kept_boxes, mode, inclusive, other=b) > threshold).any(dim=0)
            head, b = head[alive], b[alive]
        over = torch.triu(box_overlap(b, mode, inclusive) > threshold, diagonal=1)  # only higher scores suppress
        keep = torch.ones(len(b), dtype=torch.bool, device=b.device)
        for _ in range(len(b)):
            new = ~(over & keep[:, None]).any(dim=0)
            if torch.equal(new, keep):
                break
            keep = new
        kept_idx.append(head[keep])
        kept_boxes = torch.cat([kept_boxes, b[keep]])
    return torch.cat(kept_idx)


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, mode: str = "union",
        groups: torch.Tensor | None = None, max_candidates: int = 3000, inclusive: bool = False) -> torch.Tensor:
    """Greedy NMS, exactly, as a fixed-point iteration on the overlap matrix.

    A box survives iff no *surviving* higher-scored box overlaps it above the threshold.
    Starting from "all survive" and re-applying that rule converges to the greedy answer
    (the rule has one fixed point, settled in score order), in as many rounds as the longest
    suppression chain: a handful, each one matrix operation. Boxes of different `groups`
    (images) never suppress each other; each image is handled on its own, `max_candidates`
    of its candidates at a time (see `_nms_one`). Returns kept indices, per group by score.
    `mode` and `inclusive` as in `box_overlap`.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    if groups is None:
        return _nms_one(boxes, scores, threshold, mode, inclusive, max_candidates)
    kept = []
    for g in torch.unique(groups).tolist():  # a loop over images, not boxes
        idx = torch.nonzero(groups == g).squeeze(1)
        kept.append(idx[_nms_one(boxes[idx], scores[idx], threshold, mode, inclusive, max_candidates)])
    return torch.cat(kept)


def square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow each box to a square around its centre (the reference's `rerec`, same float order)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x1 = boxes[:, 0] + w * 0.5 - side * 0.5
    y1 = boxes[:, 1] + h * 0.5 - side * 0.5
    return torch.stack([x1, y1, x1 + side, y1 + side], 1)


def regress(boxes: torch.Tensor, reg: torch.Tensor, inclusive: bool = True) -> torch.Tensor:
    """Apply predicted offsets, in units of the box size.

    The reference sizes R-Net's and O-Net's boxes pixel-inclusively (x2 - x1 + 1, its
    `bbreg`) but P-Net's as x2 - x1 (inline in `detect_face`); `inclusive` picks which.
    """
    one = 1 if inclusive else 0
    w = boxes[:, 2] - boxes[:, 0] + one
    h = boxes[:, 3] - boxes[:, 1] + one
    return boxes + reg * torch.stack([w, h, w, h], 1)


def crop_windows(boxes: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, ...]:
    """The pixel window each box's crop is cut from, as 0-based half-open rows and columns.

    The reference's `pad`: truncate the float box toward zero, read it as 1-based inclusive
    pixel coordinates and clip it to the image. Nothing is padded: a box that sticks out of
    the image gives a smaller crop, which is then stretched to the network's input size.
    """
    b = boxes.trunc().long()
    x0, y0 = b[:, 0].clamp_min(1) - 1, b[:, 1].clamp_min(1) - 1
    x1, y1 = b[:, 2].clamp_max(w), b[:, 3].clamp_max(h)
    return x0, y0, x1, y1


def _area_bins(start: torch.Tensor, length: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # adaptive_avg_pool2d's bins (what F.interpolate(mode="area") uses): output cell i
    # averages input [floor(i * L / size), ceil((i + 1) * L / size)).
    i = torch.arange(size, device=start.device)
    lo = start[:, None] + torch.div(i * length[:, None], size, rounding_mode="floor")
    hi = start[:, None] + torch.div((i + 1) * length[:, None] + size - 1, size, rounding_mode="floor")
    return lo, hi


def crop_resize(images: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor,
                size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of the raw images cut at `crop_windows(boxes)`, area-resampled to size x size.

    Returns (crops, valid); an empty window (a box entirely off the image) gives valid False
    and a meaningless crop. Equals cutting each crop and calling
    F.interpolate(crop, (size, size), mode="area"), as the reference does one crop at a time,
    but every crop of an image comes from one summed-area table of that image: each output
    pixel is a box sum (four lookups) divided by its bin's height, then width, as PyTorch's
    kernel does. The table is float64, so the sums of 8-bit pixel values are exact, and so
    are the means wherever the reference's float32 sums are (any bin under 65,000 pixels).
    """
    n = len(boxes)
    _, c, h, w = images.shape
    x0, y0, x1, y1 = crop_windows(boxes, h, w)
    valid = (x1 > x0) & (y1 > y0)
    zero = torch.zeros_like(x0)
    x0, y0 = torch.where(valid, x0, zero), torch.where(valid, y0, zero)
    x1, y1 = torch.where(valid, x1, zero + 1), torch.where(valid, y1, zero + 1)
    ys, ye = _area_bins(y0, y1 - y0, size)
    xs, xe = _area_bins(x0, x1 - x0, size)
    kh = (ye - ys).float()[:, None, :, None]
    kw = (xe - xs).float()[:, None, None, :]
    out = torch.empty((n, c, size, size), dtype=torch.float32, device=images.device)
    if n == 0:
        return out, valid
    for g in torch.unique(image_index).tolist():  # a loop over images, not boxes
        idx = torch.nonzero(image_index == g).squeeze(1)
        sat = F.pad(images[g].double().cumsum(1).cumsum(2), (1, 0, 1, 0)).reshape(c, -1)

        def at(rows, cols):  # table values at (rows x cols) of each crop: (c, k, size, size)
            return sat[:, rows[idx][:, :, None] * (w + 1) + cols[idx][:, None, :]]

        sums = at(ye, xe)
        sums -= at(ys, xe)
        sums -= at(ye, xs)
        sums += at(ys, xs)
        out[idx] = sums.transpose(0, 1).float() / kh[idx] / kw[idx]
    return out, valid


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 127.5) * 0.0078125


@dataclass
class Detection:
    box: np.ndarray  # x1, y1, x2, y2 (float)
    score: float
    landmarks: np.ndarray  # (5, 2): image-left eye, image-right eye, nose, mouth left, mouth right


class MTCNN:
    def __init__(self, weights: dict[str, dict] | None = None, device: str | torch.device = "cpu",
                 min_face_size: int = 20, thresholds=(0.6, 0.7, 0.7), factor: float = 0.709):
        self.device = torch.device(device)
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        if weights is None:
            from cleaning.detect.weights import load_mtcnn_weights

            weights = load_mtcnn_weights()
        for name in ("pnet", "rnet", "onet"):
            getattr(self, name).load_state_dict(weights[name])
            getattr(self, name).to(self.device).eval()
        self.min_face_size, self.thresholds, self.factor = min_face_size, thresholds, factor

    def _scales(self, h: int, w: int) -> list[float]:
        # Repeated multiplication, as the reference: factor ** k differs in the last bits,
        # which can change int(h * scale + 1), the size of a pyramid level.
        m = 12.0 / self.min_face_size
        side = min(h, w) * m
        scale, scales = m, []
        while side >= 12:
            scales.append(scale)
            scale *= self.factor
            side *= self.factor
        return scales

    @torch.no_grad()
    def detect(self, images: list[np.ndarray]) -> list[list[Detection]]:
        """Faces in each RGB uint8 image (H, W, 3), by descending score. Images of equal size are batched."""
        results: list[list[Detection]] = [[] for _ in images]
        by_size: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(img.shape[:2], []).append(i)
        for idx in by_size.values():
            batch = torch.from_numpy(np.stack([images[i] for i in idx])).to(self.device)
            for j, dets in enumerate(self._detect_batch(batch.permute(0, 3, 1, 2).float())):
                results[idx[j]] = dets
        return results

    def _detect_batch(self, imgs: torch.Tensor) -> list[list[Detection]]:
        """The cascade on raw (0..255) images (N, 3, H, W)."""
        n, _, h, w = imgs.shape
        no_faces: list[list[Detection]] = [[] for _ in range(n)]
        # Stage 1: P-Net over the pyramid, all images of the batch per scale at once. As the
        # reference: resample the raw image, then normalise; P-Net's threshold is inclusive,
        # R-Net's and O-Net's strict.
        all_boxes, all_img = [], []
        for scale in self._scales(h, w):
            level = F.interpolate(imgs, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
            reg, prob = self.pnet(_normalise(level))
            img_i, yy, xx = torch.nonzero(prob[:, 1] >= self.thresholds[0], as_tuple=True)
            if len(img_i) == 0:
                continue
            score = prob[img_i, 1, yy, xx]
            offsets = reg[img_i, :, yy, xx]
            # Output cell (x, y) looks at the 12x12 window at (2x, 2y) of the scaled image;
            # the reference maps it back as 1-based pixel coordinates, floored.
            pts = torch.stack([xx, yy], 1).to(reg.dtype)
            q1 = ((2 * pts + 1) / scale).floor()
            q2 = ((2 * pts + 12) / scale).floor()
            boxes = torch.cat([q1, q2, score[:, None], offsets], 1)
            keep = nms(boxes[:, :4], score, 0.5, groups=img_i)
            all_boxes.append(boxes[keep])
            all_img.append(img_i[keep])
        if not all_boxes:
            return no_faces
        boxes, img_i = torch.cat(all_boxes), torch.cat(all_img)
        keep = nms(boxes[:, :4], boxes[:, 4], 0.7, groups=img_i)
        boxes, img_i = boxes[keep], img_i[keep]
        rect = square(regress(boxes[:, :4], boxes[:, 5:9], inclusive=False))
        # Stage 2: R-Net on 24x24 crops.
        crops, valid = crop_resize(imgs, img_i, rect, 24)
        reg, prob = self.rnet(_normalise(crops))
        # A box wholly off the image has no crop: dropped (the reference would fail there,
        # its list of crops falling out of step with its boxes).
        ok = (prob[:, 1] > self.thresholds[1]) & valid
        rect, score, reg, img_i = rect[ok], prob[ok, 1], reg[ok], img_i[ok]
        keep = nms(rect, score, 0.7, groups=img_i)
        rect = square(regress(rect[keep], reg[keep]))
        img_i = img_i[keep]
        if len(rect) == 0:
            return no_faces
        # Stage 3: O-Net on 48x48 crops, with landmarks.
        crops, valid = crop_resize(imgs, img_i, rect, 48)
        reg, lm, prob = self.onet(_normalise(crops))
        ok = (prob[:, 1] > self.thresholds[2]) & valid
        base, score, reg, lm, img_i = rect[ok], prob[ok, 1], reg[ok], lm[ok], img_i[ok]
        # Landmarks are fractions of the O-Net box (float, before its regression), mapped
        # back as the reference does: (x2 - x1 + 1) * p + x1 - 1.
        bw, bh = base[:, 2] - base[:, 0] + 1, base[:, 3] - base[:, 1] + 1
        lx = bw[:, None] * lm[:, :5] + base[:, 0:1] - 1
        ly = bh[:, None] * lm[:, 5:] + base[:, 1:2] - 1
        final = regress(base, reg)
        keep = nms(final, score, 0.7, mode="min", groups=img_i, inclusive=True)
        final, score, img_i = final[keep].cpu().numpy(), score[keep].cpu().numpy(), img_i[keep].cpu().numpy()
        landmarks = torch.stack([lx[keep], ly[keep]], 2).cpu().numpy()
        out: list[list[Detection]] = [[] for _ in range(n)]
        for k in range(len(final)):
            out[int(img_i[k])].append(Detection(final[k], float(score[k]), landmarks[k]))
        return out
