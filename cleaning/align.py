"""Five-point alignment to the ArcFace 112x112 template.

A least-squares similarity transform (Umeyama: rotation, uniform scale, translation; 4
degrees of freedom) maps the five landmarks onto the template; `cv2.warpAffine` resamples
with a black border. This is the alignment insightface used to build MS1MV2/MS1MV3.
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.transform import SimilarityTransform

# Image-left eye, image-right eye, nose tip, left mouth corner, right mouth corner.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


class AlignmentError(ValueError):
    pass


def template(size: int = 112) -> np.ndarray:
    return ARCFACE_TEMPLATE * (size / 112.0)


def similarity_matrix(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """2x3 matrix taking source-image coordinates to aligned-crop coordinates."""
    src = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    if not np.all(np.isfinite(src)):
        raise AlignmentError("landmarks contain NaN or infinity")
    tform = SimilarityTransform.from_estimate(src, template(size))
    if not tform:  # a failed estimate is falsy (degenerate, e.g. all points equal)
        raise AlignmentError("landmarks are degenerate: no similarity transform fits them")
    return np.asarray(tform.params[:2], dtype=np.float64)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    matrix = similarity_matrix(landmarks, size)
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
