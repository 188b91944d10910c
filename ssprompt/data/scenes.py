"""Seeded panoptic scenes composed from real labelled images, and the named tasks built on them.

A scene is a 96 x 96 RGB image with full panoptic ground truth: stuff regions textured with real
photographs (scikit-image), and things pasted from Fashion-MNIST / MNIST whose instance masks are
the items' own pixels. Scene ``i`` of a split is a pure function of (task, split, i): the same
index always gives the same pixels and labels, on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from ..errors import UserError
from ..lru import LRUCache
from . import sources

# The label of void pixels (unlabelled; never scored) in every semantic map: label maps are
# int32, so any class index 0..2**31-1 is free and void can never collide with one.
VOID = -1

# ---------------------------------------------------------------------------------- vocabulary
CLASS_NAMES: list[str] = sources.FASHION_NAMES + sources.DIGIT_NAMES + list(sources.STUFF_SOURCES)
IS_THING: list[bool] = [True] * 20 + [False] * len(sources.STUFF_SOURCES)
FASHION_IDS = list(range(10))
DIGIT_IDS = list(range(10, 20))
STUFF_IDS = list(range(20, len(CLASS_NAMES)))
HELD_OUT = [CLASS_NAMES.index(n) for n in ("sandal", "bag", "digit three", "digit seven",
                                          "gravel", "tissue")]
SOURCE_THINGS = [c for c in FASHION_IDS + DIGIT_IDS if c not in HELD_OUT]
SOURCE_STUFF = [c for c in STUFF_IDS if c not in HELD_OUT]
NOVEL_THINGS = [c for c in FASHION_IDS + DIGIT_IDS if c in HELD_OUT]
NOVEL_STUFF = [c for c in STUFF_IDS if c in HELD_OUT]


@dataclass(frozen=True)
class TaskSpec:
    """How one named task composes its scenes and which class names it prompts with."""

    name: str
    vocab: tuple[int, ...]                 # global class ids, in prompt order
    things: tuple[int, ...]                # thing classes scenes draw from
    stuff: tuple[int, ...]                 # stuff classes scenes draw from
    n_stuff: tuple[int, int] = (1, 3)      # inclusive range of stuff regions
    n_things: tuple[int, int] = (2, 5)     # inclusive range of pasted things
    thing_px: tuple[int, int] = (26, 46)   # side of a pasted 28x28 item, pixels
    must_have: tuple[int, ...] = ()        # every scene contains >= 1 thing and 1 stuff of these
    corrupt: bool = False                  # adverse conditions (darkness, noise, blur, fog, cast)
    seed: int = 0
    description: str = ""


_SRC = tuple(SOURCE_THINGS + SOURCE_STUFF)
_ALL = tuple(range(len(CLASS_NAMES)))
TASKS: dict[str, TaskSpec] = {
    "source": TaskSpec("source", _SRC, tuple(SOURCE_THINGS), tuple(SOURCE_STUFF), seed=1000,
                       description="pretraining corpus: the source vocabulary, clean images"),
    "shift": TaskSpec("shift", _SRC, tuple(SOURCE_THINGS), tuple(SOURCE_STUFF), corrupt=True,
                      seed=2000, description="source classes under darkness, noise, blur, fog, "
                                             "colour cast"),
    "novel": TaskSpec("novel", _ALL, tuple(SOURCE_THINGS + NOVEL_THINGS),
                      tuple(SOURCE_STUFF + NOVEL_STUFF), must_have=tuple(HELD_OUT), seed=3000,
                      description="held-out class names the SFM never trained on, among source "
                                  "ones"),
    "stuff": TaskSpec("stuff", _ALL, tuple(SOURCE_THINGS), tuple(STUFF_IDS), n_stuff=(3, 5),
                      n_things=(0, 2), thing_px=(20, 32), must_have=tuple(NOVEL_STUFF), seed=4000,
                      description="background-heavy scenes: many stuff regions, few small things"),
}
DOWNSTREAM = ("shift", "novel", "stuff")
SPLIT_CODES = {"train": 1, "test": 2, "pool": 3}
TRAIN_POOL = 1000  # k-shot training images are drawn from the first TRAIN_POOL train scenes


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"task {name}: unknown task; choose one of {', '.join(TASKS)}",
                        field="task")
    return TASKS[name]


@dataclass
class Scene:
    image: np.ndarray          # uint8 (H, W, 3)
    semantic: np.ndarray       # int32 (H, W): index into the task vocabulary, VOID = void
    instance: np.ndarray       # int32 (H, W): segment id, 0 = void
    segments: list[dict] = field(default_factory=list)  # {"id", "category", "isthing", "area"}
    # The dataset's own instance annotations, where it has any that the maps above cannot hold
    # (COCO instances: masks may overlap, and an instance may be hidden by others): one dict
    # per annotation, {"category", "iscrowd", "counts"} (compressed COCO RLE bytes at the
    # scene's size). When present, AP50 scores against these instead of the thing segments
    # of ``instance``; mIoU and PQ always use the flattened maps. None: the maps are exact.
    annotations: list[dict] | None = None

    def targets(self, size=None) -> tuple[np.ndarray, np.ndarray]:
        """(labels int64 [S], masks bool [S, H, W]) in segment order; with ``size``, in the
        SFM's input frame (segments too small to survive the resize are left out): an int is
        the letterboxed ``size`` x ``size`` frame, a backend geometry
        (``geometry.geometry_of(sfm)``) that backend's own frame."""
        from ..geometry import geometry_of

        instance = self.instance if size is None else geometry_of(size).labels(self.instance)
        segs = self.segments
        if instance is not self.instance:
            present = set(np.unique(instance).tolist())
            segs = [s for s in segs if s["id"] in present]
        labels = np.array([s["category"] for s in segs], dtype=np.int64)
        ids = np.array([s["id"] for s in segs], dtype=np.int32)
        masks = instance[None] == ids[:, None, None]
        return labels, masks


# ---------------------------------------------------------------------------- item pools
class _ItemPool:
    """Per-class lists of 28x28 items, from the train or test half of the sources."""

    def __init__(self, half: str):
        fx, fy = sources.fashion_mnist(half)
        dx, dy = sources.mnist_digits(half)
        self.items: dict[int, np.ndarray] = {}
        for c in range(10):
            self.items[c] = fx[fy == c]
            self.items[10 + c] = dx[dy == c]


_POOLS: dict[str, _ItemPool] = {}


def _pool(half: str) -> _ItemPool:
    if half not in _POOLS:
        _POOLS[half] = _ItemPool(half)
    return _POOLS[half]


def _tile_to(tex: np.ndarray, size: int) -> np.ndarray:
    reps = (int(np.ceil(size / tex.shape[0])), int(np.ceil(size / tex.shape[1])), 1)
    return np.tile(tex, reps) if reps[0] > 1 or reps[1] > 1 else tex


def _stuff_patch(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    tex = _tile_to(sources.texture(CLASS_NAMES[cls]), size)
    y = rng.integers(0, tex.shape[0] - size + 1)
    x = rng.integers(0, tex.shape[1] - size + 1)
    patch = tex[y:y + size, x:x + size]
    patch = np.rot90(patch, rng.integers(0, 4))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    return patch * rng.uniform(0.85, 1.15) * rng.uniform(0.92, 1.08, size=3)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    import colorsys

    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.7, 1.0)))


def _thing_sprite(rng: np.random.Generator, cls: int, pool: _ItemPool, side: int):
    items = pool.items[cls]
    item = items[rng.integers(0, len(items))]
    img = np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR), np.float32) / 255
    if cls in DIGIT_IDS:
        mask = img > 0.35
        rgb = np.broadcast_to(_random_colour(rng), img.shape + (3,))
    else:
        mask = ndimage.binary_fill_holes(img > 0.06)
        shade = 0.35 + 0.65 * img
        rgb = shade[..., None] * _random_colour(rng)
    if rng.random() < 0.5:
        mask, rgb = mask[:, ::-1], rgb[:, ::-1]
    return mask, rgb


def _corrupt(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Adverse conditions: two of darkness, noise, blur, fog, colour cast."""
    ops = rng.choice(5, size=2, replace=False)
    for op in ops:
        if op == 0:    # darkness
            img = img * rng.uniform(0.15, 0.35)
        elif op == 1:  # sensor noise
            img = img + rng.normal(0, rng.uniform(0.10, 0.18), img.shape)
        elif op == 2:  # defocus blur
            img = ndimage.gaussian_filter(img, sigma=(rng.uniform(1.2, 1.8),) * 2 + (0,))
        elif op == 3:  # fog
            a = rng.uniform(0.55, 0.75)
            img = img * (1 - a) + a * rng.uniform(0.6, 0.85)
        else:          # colour cast
            img = img * rng.uniform(0.3, 1.4, size=3)
    return img


def make_scene(spec: TaskSpec, split: str, index: int, size: int = 96) -> Scene:
    """Scene ``index`` of ``split`` ('train' | 'test') of task ``spec``; deterministic."""
    rng = np.random.default_rng([spec.seed, SPLIT_CODES[split], index])
    pool = _pool("test" if split == "test" else "train")
    vocab_index = {c: i for i, c in enumerate(spec.vocab)}
    must_things = [c for c in spec.must_have if IS_THING[c] and c in spec.things]
    must_stuff = [c for c in spec.must_have if not IS_THING[c] and c in spec.stuff]

    # stuff: a warped Voronoi partition, one texture per region
    k = int(rng.integers(spec.n_stuff[0], spec.n_stuff[1] + 1))
    stuff_cls = list(rng.choice(spec.stuff, size=min(k, len(spec.stuff)), replace=False))
    if must_stuff and not set(stuff_cls) & set(must_stuff):
        stuff_cls[0] = int(rng.choice(must_stuff))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    seeds = rng.uniform(0, size, size=(len(stuff_cls), 2))
    warp = [rng.uniform(4, 10) * np.sin(yy / rng.uniform(8, 20) + rng.uniform(0, 6.3))
            + rng.uniform(4, 10) * np.sin(xx / rng.uniform(8, 20) + rng.uniform(0, 6.3))
            for _ in stuff_cls]
    dist = np.stack([np.hypot(yy - sy, xx - sx) + w for (sy, sx), w in zip(seeds, warp)])
    region = dist.argmin(0)
    image = np.zeros((size, size, 3), np.float32)
    semantic = np.full((size, size), VOID, np.int32)
    for r, c in enumerate(stuff_cls):
        m = region == r
        image[m] = _stuff_patch(rng, int(c), size)[m]
        semantic[m] = vocab_index[int(c)]

    # things: pasted items, later ones on top; a placement that would hide more than half of an
    # earlier item is retried, so every instance stays recognisable
    n = int(rng.integers(spec.n_things[0], spec.n_things[1] + 1))
    if must_things and n == 0:
        n = 1
    thing_cls = list(rng.choice(spec.things, size=n)) if n else []
    if must_things and not set(thing_cls) & set(must_things):
        thing_cls[0] = int(rng.choice(must_things))
    visible: list[np.ndarray] = []
    placed: list[int] = []
    for c in thing_cls:
        for _ in range(10):
            side = int(rng.integers(spec.thing_px[0], spec.thing_px[1] + 1))
            mask, rgb = _thing_sprite(rng, int(c), pool, side)
            y, x = rng.integers(0, size - side + 1, size=2)
            full = np.zeros((size, size), bool)
            full[y:y + side, x:x + side] = mask
            if full.sum() < 20:
                continue
            if all((v & ~full).sum() >= 0.5 * v.sum() for v in visible):
                break
        else:
            continue
        image[y:y + side, x:x + side][mask] = rgb[mask]
        visible = [v & ~full for v in visible] + [full]
        placed.append(int(c))

    if spec.corrupt:
        image = _corrupt(rng, image)
    image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)

    instance = np.zeros((size, size), np.int32)
    segments: list[dict] = []
    for r, c in enumerate(stuff_cls):
        m = (region == r)
        for v in visible:
            m = m & ~v
        if m.sum() < 24:  # slivers of stuff are void, as COCO leaves unlabelled crumbs
            semantic[m] = VOID
            continue
        segments.append({"id": len(segments) + 1, "category": vocab_index[int(c)],
                         "isthing": False, "area": int(m.sum())})
        instance[m] = segments[-1]["id"]
    for v, c in zip(visible, placed):
        segments.append({"id": len(segments) + 1, "category": vocab_index[c],
                         "isthing": True, "area": int(v.sum())})
        instance[v] = segments[-1]["id"]
        semantic[v] = vocab_index[c]
    return Scene(image, semantic, instance, segments)


class SceneSplit:
    """A fixed list of scenes of one task: ``test`` (first n), a k-shot ``train`` draw from the
    first TRAIN_POOL train scenes, or ``val`` (n train scenes past the pool, for tuning)."""

    def __init__(self, task: str, split: str, n: int | None = None, shots: int = 16,
                 seed: int = 0, size: int = 96, cache_bytes: int = 256 * 1024 ** 2,
                 test_from: int = 0):
        self.spec = get_task(task)
        self.task, self.split, self.size = task, split, size
        if split == "test":
            n = 200 if n is None else n
            if n <= 0:
                raise UserError(f"n_test {n}: must be positive", field="n_test")
            self.indices = list(range(test_from, test_from + n))
        elif split == "val":  # train-distribution scenes never drawn as shots: for tuning
            n = 100 if n is None else n
            self.indices = list(range(TRAIN_POOL, TRAIN_POOL + n))
        elif split == "train":
            if not 0 < shots <= TRAIN_POOL:
                raise UserError(f"shots {shots}: must be in 1..{TRAIN_POOL} (the train pool)",
                                field="shots")
            rng = np.random.default_rng([self.spec.seed, 7, seed])
            self.indices = sorted(rng.choice(TRAIN_POOL, size=shots, replace=False).tolist())
        else:
            raise UserError(f"split {split!r}: unknown; use 'train', 'val' or 'test'")
        self.pool_size = TRAIN_POOL if split == "train" else len(self.indices)
        self._cache = LRUCache(cache_bytes)
        self.scene_split = "test" if split == "test" else "train"

    @property
    def class_names(self) -> list[str]:
        return [CLASS_NAMES[c] for c in self.spec.vocab]

    @property
    def is_thing(self) -> list[bool]:
        return [IS_THING[c] for c in self.spec.vocab]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Scene:
        scene = self._cache.get(i)
        if scene is None:
            scene = self._cache[i] = make_scene(self.spec, self.scene_split, self.indices[i],
                                                self.size)
        return scene
