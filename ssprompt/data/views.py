"""Class-agnostic views of a scene: the 2-class (object vs background) problem a text-less SFM
is scored on, and the training targets of a class-agnostic SFM."""

from __future__ import annotations

import copy

import numpy as np

from .scenes import VOID

AGNOSTIC_NAMES, AGNOSTIC_IS_THING = ["object", "background"], [True, False]

def object_vs_background(scene):
    """Ground truth of the class-agnostic 2-class problem: every thing segment becomes class 0
    ("object", a thing class; crowd flags kept; so do ``annotations``, where the scene has them),
    all stuff pixels one segment of class 1
    ("background", a stuff class); void stays void. Scored by mIoU over both classes, AP50 over
    the object class and PQ over both (PQ_th: objects, PQ_st: background)."""
    s = copy.copy(scene)
    thing_ids = [seg["id"] for seg in scene.segments if seg["isthing"]]
    stuff_ids = [seg["id"] for seg in scene.segments if not seg["isthing"]]
    thing, stuff = np.isin(scene.instance, thing_ids), np.isin(scene.instance, stuff_ids)
    s.semantic = np.select([thing, stuff], [0, 1], VOID).astype(np.int32)
    s.segments = [dict(seg, category=0) for seg in scene.segments if seg["isthing"]]
    s.instance = np.where(thing, scene.instance, 0).astype(np.int32)
    if getattr(scene, "annotations", None) is not None:  # AP50's own masks: objects too
        s.annotations = [dict(a, category=0) for a in scene.annotations]
    if stuff.any():
        bg = int(max(seg["id"] for seg in scene.segments)) + 1
        s.instance[stuff] = bg
        s.segments.append({"id": bg, "category": 1, "isthing": False, "iscrowd": 0,
                           "area": int(stuff.sum())})
    return s


def class_agnostic(scene):
    """Training targets of a class-agnostic SFM: every thing segment becomes class 0
    ("object"); stuff becomes void (its queries learn "no object" there)."""
    s = copy.copy(scene)
    thing_ids = [seg["id"] for seg in scene.segments if seg["isthing"]]
    keep = np.isin(scene.instance, thing_ids)
    s.semantic = np.where(keep, 0, VOID).astype(np.int32)
    s.instance = np.where(keep, scene.instance, 0).astype(np.int32)
    s.segments = [dict(seg, category=0) for seg in scene.segments if seg["isthing"]]
    return s
