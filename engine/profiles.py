"""Optimization profiles: ranges of padded image sizes, and the tensor shapes they give each graph.

A profile is stated once, in image terms (batch x height x width of the padded image), and turned
into min/opt/max shapes for every dynamic input of every graph through the symbolic shapes of the
export manifest (["batch", 4, "height/8", "width/8"], ...). The same symbolic shapes run backwards
at run time: the shapes of a graph's inputs give the image size, which picks the profile.
"""

from __future__ import annotations

from typing import NamedTuple

Dims = list[int | str]  # one tensor's symbolic shape, as the export manifest writes it


class ImageSize(NamedTuple):
    """A batch of padded images."""

    batch: int
    height: int
    width: int

    @staticmethod
    def parse(text: str) -> "ImageSize":
        """"BxHxW", e.g. "1x512x768"."""
        try:
            b, h, w = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"image size must be BATCHxHEIGHTxWIDTH, e.g. 1x512x768, got {text!r}") from None
        return ImageSize(b, h, w)

    def __str__(self) -> str:
        return f"{self.batch}x{self.height}x{self.width}"


class ShapeProfile(NamedTuple):
    min: ImageSize
    opt: ImageSize
    max: ImageSize

    @staticmethod
    def parse(text: str) -> "ShapeProfile":
        """"MIN:OPT:MAX", each BxHxW, e.g. "1x256x256:1x512x768:4x1024x1024"."""
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"a profile is MIN:OPT:MAX, each BATCHxHEIGHTxWIDTH, got {text!r}")
        return ShapeProfile(*(ImageSize.parse(p) for p in parts))

    @staticmethod
    def exact(size: ImageSize) -> "ShapeProfile":
        return ShapeProfile(size, size, size)

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    def check(self, pad_multiple: int) -> None:
        for size in self:
            if size.batch < 1 or size.height < 1 or size.width < 1:
                raise ValueError(f"profile {self}: sizes must be positive")
            if size.height % pad_multiple or size.width % pad_multiple:
                raise ValueError(f"profile {self}: heights and widths must be multiples of {pad_multiple}")
        if not all(lo <= mid <= hi for lo, mid, hi in zip(self.min, self.opt, self.max)):
            raise ValueError(f"profile {self}: needs min <= opt <= max in batch, height and width")

    def covers(self, size: ImageSize) -> bool:
        return all(lo <= v <= hi for lo, v, hi in zip(self.min, size, self.max))

    def input_shapes(self, shapes: dict[str, Dims], inputs: list[str]) -> dict[str, tuple[tuple[int, ...], ...]]:
        """(min, opt, max) shape of every dynamic input of a graph."""
        return {name: tuple(resolve(shapes[name], size) for size in self)
                for name in inputs if any(isinstance(d, str) for d in shapes[name])}


DEFAULT_PROFILE = "1x256x256:1x512x768:4x1024x1024"


def resolve(dims: Dims, size: ImageSize) -> tuple[int, ...]:
    """The concrete shape of a tensor for a batch of padded images."""
    return tuple(d if isinstance(d, int) else _value(d, size) for d in dims)


def _value(dim: str, size: ImageSize) -> int:
    name, _, divisor = dim.partition("/")
    if name not in ImageSize._fields:
        raise ValueError(f"unknown symbolic dimension {dim!r}")
    value, k = int(getattr(size, name)), int(divisor or 1)
    if value % k:
        raise ValueError(f"{name} {value} is not a multiple of {k} (dimension {dim!r})")
    return value // k


def image_size(shapes: dict[str, Dims], tensors: dict[str, tuple[int, ...]]) -> ImageSize:
    """The image size that gives these tensor shapes (the inverse of `resolve`)."""
    found: dict[str, int] = {}
    for name, shape in tensors.items():
        dims = shapes[name]
        if len(shape) != len(dims):
            raise ValueError(f"{name}: expected {len(dims)} dimensions {dims}, got shape {tuple(shape)}")
        for d, v in zip(dims, shape):
            if isinstance(d, int):
                if v != d:
                    raise ValueError(f"{name}: expected shape {dims}, got {tuple(shape)}")
                continue
            var, _, divisor = d.partition("/")
            value = v * int(divisor or 1)
            if found.setdefault(var, value) != value:
                raise ValueError(f"{name}: shape {tuple(shape)} disagrees with the other inputs on the {var}")
    missing = [f for f in ImageSize._fields if f not in found]
    if missing:
        raise ValueError(f"the inputs {sorted(tensors)} do not determine the {', '.join(missing)}")
    return ImageSize(found["batch"], found["height"], found["width"])
