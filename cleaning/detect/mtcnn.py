"""MTCNN face detector (Zhang et al. 2016): P-Net proposals, R-Net refinement, O-Net landmarks.

Our own network code and cascade; the pretrained weights are the MIT-licensed ones that
ship in the facenet-pytorch 2.6.0 wheel (`make setup` fetches them into the cache; see
`cleaning.detect.weights`). Their state-dict layout is the one these modules declare.

Throughput choices: every image of a batch with the same size runs through each pyramid
scale in one P-Net call; R-Net and O-Net see all candidate crops of the batch at once; NMS
is a vectorised fixed-point iteration (no Python loop over boxes); everything runs on the
detector's device (CPU or GPU).
"""

from __future__ import annotations

import math
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

def box_overlap(boxes: torch.Tensor, mode: str = "union") -> torch.Tensor:
    """Pairwise IoU ('union') or intersection over the smaller box ('min')."""
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1 + 1).clamp_min(0) * (y2 - y1 + 1).clamp_min(0)
    w = (torch.minimum(x2[:, None], x2[None]) - torch.maximum(x1[:, None], x1[None]) + 1).clamp_min(0)
    h = (torch.minimum(y2[:, None], y2[None]) - torch.maximum(y1[:, None], y1[None]) + 1).clamp_min(0)
    inter = w * h
    if mode == "min":
        return inter / torch.minimum(area[:, None], area[None]).clamp_min(1e-9)
    return inter / (area[:, None] + area[None] - inter).clamp_min(1e-9)


def _nms_one(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, mode: str, max_candidates: int) -> torch.Tensor:
    order = torch.argsort(scores, descending=True)[:max_candidates]
    b = boxes[order]
    over = torch.triu(box_overlap(b, mode) > threshold, diagonal=1)  # only higher scores suppress
    keep = torch.ones(len(b), dtype=torch.bool, device=b.device)
    for _ in range(len(b)):
        new = ~(over & keep[:, None]).any(dim=0)
        if torch.equal(new, keep):
            break
        keep = new
    return order[keep]


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, mode: str = "union",
        groups: torch.Tensor | None = None, max_candidates: int = 3000) -> torch.Tensor:
    """Greedy NMS, exactly, as a fixed-point iteration on the overlap matrix.

    A box survives iff no *surviving* higher-scored box overlaps it above the threshold.
    Starting from "all survive" and re-applying that rule converges to the greedy answer
    (the rule has one fixed point, settled in score order), in as many rounds as the longest
    suppression chain: a handful, each one matrix operation. Boxes of different `groups`
    (images) never suppress each other; each image is handled on its own, so the overlap
    matrix stays at most `max_candidates`^2 (the highest-scored candidates; P-Net on a
    large real photo proposes tens of thousands). Returns kept indices, per group by score.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    if groups is None:
        return _nms_one(boxes, scores, threshold, mode, max_candidates)
    kept = []
    for g in torch.unique(groups).tolist():  # a loop over images, not boxes
        idx = torch.nonzero(groups == g).squeeze(1)
        kept.append(idx[_nms_one(boxes[idx], scores[idx], threshold, mode, max_candidates)])
    return torch.cat(kept)


def square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow each box to a square around its centre (R-Net and O-Net want square crops)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x1 = boxes[:, 0] + 0.5 * (w - side)
    y1 = boxes[:, 1] + 0.5 * (h - side)
    return torch.stack([x1, y1, x1 + side, y1 + side], 1)


def regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    return boxes + reg * torch.stack([w, h, w, h], 1)


def crop_resize(images: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crops (zero outside the image) resized to size x size, area-averaged.

    Each output pixel averages k x k bilinear samples over its footprint (k from the
    largest crop, capped at 4), which approximates the area resampling the networks were
    trained with; plain bilinear would alias large crops.
    """
    n = len(boxes)
    if n == 0:
        return images.new_zeros((0, images.shape[1], size, size))
    _, c, h, w = images.shape
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).max() + 1
    k = int(min(4, max(1, math.ceil(float(side) / size))))
    m = size * k
    t = (torch.arange(m, device=boxes.device, dtype=boxes.dtype) + 0.5) / m
    x1, y1 = boxes[:, 0:1], boxes[:, 1:2]
    bw, bh = (boxes[:, 2:3] - x1 + 1), (boxes[:, 3:4] - y1 + 1)
    # Box pixel i covers [x1 + i - 1, x1 + i) in the 1-based convention of the cascade.
    gx = (x1 - 1 + t[None] * bw) / w * 2 - 1
    gy = (y1 - 1 + t[None] * bh) / h * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(n, m, m), gy[:, :, None].expand(n, m, m)], -1)
    out = images.new_empty((n, c, m, m))
    # One grid_sample per image with all its crops stacked along the grid's height: never
    # a copy of the whole image per crop (that was gigabytes on real photos).
    for g in torch.unique(image_index).tolist():
        idx = torch.nonzero(image_index == g).squeeze(1)
        sampled = F.grid_sample(images[g:g + 1], grid[idx].reshape(1, len(idx) * m, m, 2), mode="bilinear",
                                padding_mode="zeros", align_corners=False)
        out[idx] = sampled.reshape(c, len(idx), m, m).transpose(0, 1)
    return F.avg_pool2d(out, k) if k > 1 else out


@dataclass
class Detection:
    box: np.ndarray  # x1, y1, x2, y2
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
        m = 12.0 / self.min_face_size
        side = min(h, w) * m
        scales = []
        while side >= 12:
            scales.append(m * self.factor ** len(scales))
            side *= self.factor
        return scales

    @torch.no_grad()
    def detect(self, images: list[np.ndarray]) -> list[list[Detection]]:
        """Faces in each RGB uint8 image (H, W, 3). Images of equal size are batched."""
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
        n, _, h, w = imgs.shape
        norm = (imgs - 127.5) * 0.0078125
        # Stage 1: P-Net over the pyramid, all images of the batch per scale at once.
        all_boxes, all_img = [], []
        for scale in self._scales(h, w):
            hs, ws = int(h * scale + 1), int(w * scale + 1)
            reg, prob = self.pnet(F.interpolate(norm, size=(hs, ws), mode="area"))
            img_i, yy, xx = torch.nonzero(prob[:, 1] >= self.thresholds[0], as_tuple=True)
            if len(img_i) == 0:
                continue
            score = prob[img_i, 1, yy, xx]
            offsets = reg[img_i, :, yy, xx]
            # Each P-Net output cell looks at a 12x12 window with stride 2 in the scaled image.
            pts = torch.stack([xx, yy], 1).float()
            q1 = torch.floor((2 * pts + 1) / scale)
            q2 = torch.floor((2 * pts + 12) / scale)
            boxes = torch.cat([q1, q2, score[:, None], offsets], 1)
            keep = nms(boxes[:, :4], score, 0.5, groups=img_i)
            all_boxes.append(boxes[keep])
            all_img.append(img_i[keep])
        if not all_boxes:
            return [[] for _ in range(n)]
        boxes, img_i = torch.cat(all_boxes), torch.cat(all_img)
        keep = nms(boxes[:, :4], boxes[:, 4], 0.7, groups=img_i)
        boxes, img_i = boxes[keep], img_i[keep]
        rect = square(regress(boxes[:, :4], boxes[:, 5:9]))
        # Stage 2: R-Net on 24x24 crops.
        rect, img_i = self._refine(self.rnet, norm, rect, img_i, 24, self.thresholds[1])
        if len(rect) == 0:
            return [[] for _ in range(n)]
        # Stage 3: O-Net on 48x48 crops, with landmarks.
        crops = crop_resize(norm, img_i, rect[:, :4].round(), 48)
        reg, lm, prob = self.onet(crops)
        ok = prob[:, 1] >= self.thresholds[2]
        base, score, reg, lm, img_i = rect[ok, :4].round(), prob[ok, 1], reg[ok], lm[ok], img_i[ok]
        bw, bh = base[:, 2] - base[:, 0] + 1, base[:, 3] - base[:, 1] + 1
        lx = bw[:, None] * lm[:, :5] + base[:, 0:1] - 1
        ly = bh[:, None] * lm[:, 5:] + base[:, 1:2] - 1
        final = regress(base, reg)
        keep = nms(final, score, 0.7, mode="min", groups=img_i)
        out: list[list[Detection]] = [[] for _ in range(n)]
        for k in keep.tolist():
            landmarks = torch.stack([lx[k], ly[k]], 1).cpu().numpy()
            out[int(img_i[k])].append(Detection(final[k].cpu().numpy(), float(score[k]), landmarks))
        return out

    def _refine(self, net, norm, rect, img_i, size, threshold):
        crops = crop_resize(norm, img_i, rect.round(), size)
        reg, prob = net(crops)
        ok = prob[:, 1] >= threshold
        rect, score, reg, img_i = rect.round()[ok], prob[ok, 1], reg[ok], img_i[ok]
        keep = nms(rect, score, 0.7, groups=img_i)
        return square(regress(rect[keep], reg[keep])), img_i[keep]
