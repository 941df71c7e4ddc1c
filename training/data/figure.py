"""Procedural articulated human figures carrying the 17 COCO keypoints.

A figure is sampled in body units (1 unit = head height, about 1/7.5 of the standing
height) as an ordered list of primitives (back to front) plus its keypoints, then drawn
with Pillow into an RGB image, a part-label image (used for visibility) and a
per-person silhouette mask (used for the box and area).

Conventions: the figure faces the camera, so its left side is on the image's right
(+x).  Left limbs are drawn lighter and right limbs darker than their base colour,
and the face (eyes, nose, mouth, hair parting) shows where the head points, so
left/right keypoints are never ambiguous.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
# COCO's person skeleton, 1-based keypoint indices.
SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8),
    (7, 9), (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)
(TORSO, HEAD, NECK, L_UARM, R_UARM, L_FARM, R_FARM, L_HAND, R_HAND, L_THIGH, R_THIGH,
 L_SHIN, R_SHIN, L_FOOT, R_FOOT, L_EAR, R_EAR) = range(17)
NUM_PARTS = 17
# The body parts on which each keypoint may be seen; any other label over it occludes it.
KEYPOINT_PARTS = (
    (HEAD,), (HEAD, L_EAR), (HEAD, R_EAR), (HEAD, L_EAR), (HEAD, R_EAR),
    (TORSO, NECK, L_UARM), (TORSO, NECK, R_UARM), (L_UARM, L_FARM), (R_UARM, R_FARM),
    (L_FARM, L_HAND), (R_FARM, R_HAND), (TORSO, L_THIGH), (TORSO, R_THIGH),
    (L_THIGH, L_SHIN), (R_THIGH, R_SHIN), (L_SHIN, L_FOOT), (R_SHIN, R_FOOT),
)
NOMINAL_HEIGHT = 7.5  # standing height in head units
MPII_LANDMARKS = ("pelvis", "thorax", "upper_neck", "head_top")  # Figure.landmarks rows

SKIN = ((255, 224, 189), (241, 194, 125), (224, 172, 105), (198, 134, 66),
        (141, 85, 36), (92, 56, 30), (255, 205, 170))
HAIR = ((20, 20, 20), (60, 40, 25), (110, 70, 40), (200, 160, 90), (150, 150, 150), (130, 40, 20))


def _d(theta: float) -> np.ndarray:
    """Unit vector at angle theta from straight down, positive towards image +x."""
    return np.array([math.sin(theta), math.cos(theta)])


def _lighter(c, t=0.35):
    return tuple(int(v + (255 - v) * t) for v in c)


def _darker(c, t=0.35):
    return tuple(int(v * (1 - t)) for v in c)


def _vivid(rng) -> tuple:
    h, s, v = rng.random(), rng.uniform(0.45, 1.0), rng.uniform(0.35, 0.95)
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))[i]
    return tuple(int(255 * x) for x in rgb)


@dataclass
class Figure:
    """A sampled figure in body units, pelvis at the origin, y pointing down."""
    keypoints: np.ndarray                       # (17, 2)
    self_hidden: np.ndarray                     # (17,) bool: behind its own head
    prims: list = field(default_factory=list)   # (kind, part, fill, geometry), back to front
    # MPII's four joints COCO lacks, (4, 2): pelvis, thorax, upper neck, head top (see MPII_LANDMARKS)
    landmarks: np.ndarray | None = None

    def extent(self) -> np.ndarray:
        """Bounding box (x0, y0, x1, y1) of everything drawn, in body units."""
        lo, hi = np.full(2, np.inf), np.full(2, -np.inf)
        for kind, _, _, g in self.prims:
            if kind == "cap":
                pts, r = np.stack([g[0], g[1]]), max(g[2], g[3])
            elif kind == "poly":
                pts, r = g, 0.0
            else:
                pts, r = g[0][None], g[1]
            lo, hi = np.minimum(lo, pts.min(0) - r), np.maximum(hi, pts.max(0) + r)
        return np.concatenate([lo, hi])


def _arm(rng, side, shoulder, lean, colour_upper, colour_lower, skin, build, prims_out):
    """Returns (elbow, wrist) and appends the arm's primitives."""
    r = rng.random()
    if r < 0.4:
        a = rng.uniform(0.05, 0.6)          # hanging
    elif r < 0.65:
        a = rng.uniform(0.9, 2.0)           # sideways
    elif r < 0.88:
        a = rng.uniform(2.1, 3.0)           # raised
    else:
        a = rng.uniform(-0.45, 0.05)        # across the body
    bend = rng.uniform(0, 0.6) if rng.random() < 0.55 else rng.uniform(0.6, 2.4)
    t1 = -lean + side * a
    t2 = t1 + bend * (1 if rng.random() < 0.5 else -1)
    f1 = 1.0 if rng.random() < 0.7 else rng.uniform(0.55, 1.0)
    f2 = 1.0 if rng.random() < 0.7 else rng.uniform(0.5, 1.0)
    elbow = shoulder + 1.5 * f1 * _d(t1)
    wrist = elbow + 1.25 * f2 * _d(t2)
    L = (L_UARM, L_FARM, L_HAND) if side > 0 else (R_UARM, R_FARM, R_HAND)
    shade = _lighter if side > 0 else _darker
    prims_out += [
        ("cap", L[0], shade(colour_upper), (shoulder, elbow, 0.23 * build, 0.18 * build)),
        ("cap", L[1], shade(colour_lower), (elbow, wrist, 0.17 * build, 0.13 * build)),
        ("circ", L[2], shade(skin), (wrist + 0.2 * _d(t2), 0.17 * build)),
    ]
    return elbow, wrist


def _leg(rng, side, hip, colour_upper, colour_lower, shoe, build, prims_out):
    b = rng.uniform(-0.05, 0.3) if rng.random() < 0.75 else rng.uniform(0.3, 0.9)
    k = rng.normal(0, 0.2) if rng.random() < 0.75 else rng.uniform(-1.2, 1.2)
    t1 = side * b
    t2 = t1 + k
    f1 = 1.0 if rng.random() < 0.8 else rng.uniform(0.4, 0.85)
    f2 = 1.0 if rng.random() < 0.85 else rng.uniform(0.6, 1.0)
    knee = hip + 2.0 * f1 * _d(t1)
    ankle = knee + 1.9 * f2 * _d(t2)
    toe = ankle + 0.35 * _d(t2 + side * rng.uniform(0.3, 1.3))
    parts = (L_THIGH, L_SHIN, L_FOOT) if side > 0 else (R_THIGH, R_SHIN, R_FOOT)
    shade = _lighter if side > 0 else _darker
    prims_out += [
        ("cap", parts[0], shade(colour_upper), (hip, knee, 0.34 * build, 0.26 * build)),
        ("cap", parts[1], shade(colour_lower), (knee, ankle, 0.25 * build, 0.18 * build)),
        ("cap", parts[2], shade(shoe), (ankle, toe, 0.16 * build, 0.15 * build)),
    ]
    return knee, ankle


def _ellipse(c, lat, up, ax, ay, a0=0.0, a1=2 * math.pi, n=24):
    a = np.linspace(a0, a1, n)
    return c + np.outer(ax * np.cos(a), lat) + np.outer(ay * np.sin(a), up)


def sample_figure(rng: np.random.Generator) -> Figure:
    """Samples a pose, body shape and clothing; returns the figure in body units."""
    build = rng.uniform(0.8, 1.25)
    yaw_b = float(np.clip(rng.normal(0, 0.3), -0.9, 0.9))
    cyaw = math.cos(yaw_b)
    lean = rng.normal(0, 0.08) if rng.random() < 0.9 else rng.uniform(-0.5, 0.5)
    u, lat = np.array([math.sin(lean), -math.cos(lean)]), np.array([math.cos(lean), math.sin(lean)])
    skin, hair = SKIN[rng.integers(len(SKIN))], HAIR[rng.integers(len(HAIR))]
    shirt, pants, shoe = _vivid(rng), _vivid(rng), _darker(_vivid(rng), 0.4)
    sleeve = shirt if rng.random() < 0.5 else skin
    shin_c = pants if rng.random() < 0.75 else skin

    hip_w, sh_w = 0.55 * build * cyaw, 0.9 * build * cyaw
    hip_l, hip_r = lat * hip_w, -lat * hip_w
    neck_base = u * rng.uniform(2.3, 2.7)
    sh_l, sh_r = neck_base + lat * sh_w, neck_base - lat * sh_w

    legs, back_arms, front_arms = [], [], []
    sides = [1, -1] if rng.random() < 0.5 else [-1, 1]
    knees, ankles = {}, {}
    for s in sides:
        knees[s], ankles[s] = _leg(rng, s, hip_l if s > 0 else hip_r, pants, shin_c, shoe, build, legs)
    elbows, wrists = {}, {}
    for s in (1, -1):
        # Turned away from the camera (yaw_b > 0 turns the left side away): far arm behind.
        behind = (s * yaw_b > 0.3) or rng.random() < 0.12
        elbows[s], wrists[s] = _arm(rng, s, sh_l if s > 0 else sh_r, lean, shirt, sleeve, skin,
                                    build, back_arms if behind else front_arms)

    wb = 0.28 * build
    belt = u * 0.55
    waist_half = lat * (hip_w + 0.22 * build)
    torso_top = [neck_base - lat * (sh_w + wb) + u * 0.12, neck_base + lat * (sh_w + wb) + u * 0.12,
                 belt + waist_half, belt - waist_half]
    torso_bot = [belt - waist_half, belt + waist_half, hip_l + lat * wb - u * 0.05,
                 hip_l - u * 0.3, -u * 0.3, hip_r - u * 0.3, hip_r - lat * wb - u * 0.05]

    # Head: a cylinder of radius R seen from the front, turned by yaw_h.
    tilt = lean + rng.normal(0, 0.12)
    uh, lh = np.array([math.sin(tilt), -math.cos(tilt)]), np.array([math.cos(tilt), math.sin(tilt)])
    yaw_h = float(np.clip(yaw_b + rng.normal(0, 0.3), -1.25, 1.25))
    R = 0.4 * rng.uniform(0.9, 1.1)
    chin = neck_base + uh * 0.3
    c = chin + uh * 0.5

    def feature(az, r, y):
        return c + lh * (r * math.sin(az + yaw_h)) + uh * y, math.cos(az + yaw_h)

    nose, zn = feature(0.0, 1.1 * R, -0.12)
    eye_l, zel = feature(0.5, R, 0.05)
    eye_r, zer = feature(-0.5, R, 0.05)
    ear_l, zal = feature(1.35, R, 0.0)   # ears sit a little in front of the head's sides
    ear_r, zar = feature(-1.35, R, 0.0)

    prims: list = []
    ears = [("circ", L_EAR, _lighter(skin), (ear_l, 0.12)), ("circ", R_EAR, _darker(skin), (ear_r, 0.12))]
    prims += [e for e, z in zip(ears, (zal, zar)) if z < -0.15]
    prims += back_arms + legs
    prims += [("poly", TORSO, pants, np.stack(torso_bot)), ("poly", TORSO, shirt, np.stack(torso_top)),
              ("cap", NECK, skin, (neck_base, chin + uh * 0.1, 0.17 * build, 0.15 * build)),
              ("poly", HEAD, skin, _ellipse(c, lh, uh, R, 0.5))]
    hc = c - lh * (0.12 * yaw_h * R)
    prims.append(("poly", HEAD, hair, _ellipse(hc + uh * 0.18, lh, uh, 1.06 * R, 0.4, 0, math.pi, 12)))
    prims += [e for e, z in zip(ears, (zal, zar)) if z >= -0.15]
    if zn > 0.0:
        prims.append(("circ", HEAD, _darker(skin, 0.2), (nose, 0.07)))
        m, _ = feature(0.0, 0.9 * R, -0.3)
        prims.append(("deco", HEAD, (120, 30, 40), (m, 0.05 + 0.03 * zn)))
    for e, z in ((eye_l, zel), (eye_r, zer)):
        if z > 0.15:
            prims.append(("deco", HEAD, (250, 250, 250), (e, 0.085)))
            prims.append(("deco", HEAD, (20, 20, 30), (e + lh * 0.02 * math.sin(yaw_h), 0.05)))
    prims += front_arms

    kp = np.stack([nose, eye_l, eye_r, ear_l, ear_r, sh_l, sh_r, elbows[1], elbows[-1],
                   wrists[1], wrists[-1], hip_l, hip_r, knees[1], knees[-1], ankles[1], ankles[-1]])
    hidden = np.zeros(17, bool)
    hidden[:5] = [zn <= 0.0, zel <= 0.15, zer <= 0.15, zal < -0.15, zar < -0.15]
    # MPII's extra joints from the same geometry (no random draw, so COCO sets stay byte-identical): pelvis between
    # the hips, thorax at the neck base, upper neck at the chin, head top at the crown of the hair
    landmarks = np.stack([(hip_l + hip_r) / 2, neck_base, chin, hc + uh * 0.58])
    fig = Figure(kp, hidden, prims, landmarks)

    g = rng.normal(0, 0.06) if rng.random() < 0.9 else rng.uniform(-0.9, 0.9)
    if g:
        rot = np.array([[math.cos(g), -math.sin(g)], [math.sin(g), math.cos(g)]])
        fig = transform(fig, rot, np.zeros(2), 1.0)
    return fig


def transform(fig: Figure, mat: np.ndarray, offset: np.ndarray, scale: float) -> Figure:
    """Applies p -> mat @ p + offset to all points; radii are multiplied by scale."""
    def tp(p):
        return p @ mat.T + offset

    prims = []
    for kind, part, fill, g in fig.prims:
        if kind == "cap":
            g = (tp(g[0]), tp(g[1]), g[2] * scale, g[3] * scale)
        elif kind == "poly":
            g = tp(g)
        else:
            g = (tp(g[0]), g[1] * scale)
        prims.append((kind, part, fill, g))
    return Figure(tp(fig.keypoints), fig.self_hidden.copy(), prims,
                  None if fig.landmarks is None else tp(fig.landmarks))


def draw_figure(fig: Figure, rgb, lab, mask, label_base: int, outline_w: int) -> None:
    """Draws a figure already in pixel units onto three ImageDraw objects.

    rgb gets the coloured, outlined figure; lab gets label_base + part id per part; mask
    (the person's own silhouette) gets 255.
    """
    ow = max(1, outline_w)
    for kind, part, fill, g in fig.prims:
        line = _darker(fill, 0.55)
        lv = label_base + part
        if kind == "deco":
            (x, y), r = g[0], max(g[1], 0.5)
            rgb.ellipse((x - r, y - r, x + r, y + r), fill=fill)
            continue
        if kind == "poly":
            flat = g.ravel().tolist()
            rgb.polygon(flat, fill=fill, outline=line, width=ow)
            lab.polygon(flat, fill=lv)
            mask.polygon(flat, fill=255)
            continue
        circles = [(g[0], g[1])] if kind == "circ" else [(g[0], g[2]), (g[1], g[3])]
        for (x, y), r in circles:
            box = (x - r, y - r, x + r, y + r)
            rgb.ellipse(box, fill=fill, outline=line, width=ow)
            lab.ellipse(box, fill=lv)
            mask.ellipse(box, fill=255)
        if kind == "cap":
            p, q, rp, rq = g
            d = q - p
            n = np.hypot(*d)
            if n < 1e-6:
                continue
            nv = np.array([-d[1], d[0]]) / n
            quad = np.stack([p + nv * rp, q + nv * rq, q - nv * rq, p - nv * rp])
            flat = quad.ravel().tolist()
            rgb.polygon(flat, fill=fill)
            rgb.line(flat[0:4], fill=line, width=ow)
            rgb.line(flat[4:8], fill=line, width=ow)
            lab.polygon(flat, fill=lv)
            mask.polygon(flat, fill=255)
