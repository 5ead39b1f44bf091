"""Image sizes: the model input is H×W pixels (rows, columns), square or not.

A size is given as one number S (S×S, the paper's square protocol), as "H,W", or as a rule that
keeps each folder's aspect ratio: "shorter:256" scales the shorter side to 256 and rounds the
other to the model's multiple (its total downsampling: 32 for the paper's ADM-256, 8 × that for
a latent model), "longer:512" the same for the longer side.

Stores and heads record a square size as the number S (as every store before rectangles did)
and any other as [H, W]; `as_shape` reads both.
"""

from __future__ import annotations

from collections.abc import Sequence

ImageShape = tuple[int, int]  # (height, width)
RULES = ("shorter", "longer")


def as_shape(size: int | Sequence[int]) -> ImageShape:
    """(H, W) of a recorded or configured size: S means S×S."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def recorded_size(shape: ImageShape) -> int | list[int]:
    """What a store or head records: S for a square (unchanged from square-only stores), else [H, W]."""
    height, width = shape
    return height if height == width else [height, width]


def describe(size: int | Sequence[int]) -> str:
    """"256²" for a square, "480×360" (width × height, as image sizes are said) otherwise."""
    height, width = as_shape(size)
    return f"{height}²" if height == width else f"{width}×{height}"


def parse_size(text: str) -> int | list[int]:
    """A size option: "256" (square) or "360,480" (H,W).

    Raises:
        ValueError: naming the text and the two accepted forms.
    """
    try:
        numbers = [int(part) for part in str(text).split(",")]
    except ValueError:
        numbers = []
    check_size(numbers[0] if len(numbers) == 1 else numbers, text)
    return numbers[0] if len(numbers) == 1 or numbers[0] == numbers[1] else numbers


def check_size(size: int | Sequence[int], given: object = None) -> None:
    """Refuses a size that is not one positive number or two (H, W).

    Raises:
        ValueError: naming the size (or the text it came from, `given`) and the accepted forms.
    """
    numbers = [size] if isinstance(size, int) else list(size)
    if len(numbers) not in (1, 2) or not all(isinstance(number, int) and number >= 1 for number in numbers):
        shown = size if given is None else given
        raise ValueError(f"size {shown!r}: give one number S (S×S) or H,W (rows, columns), e.g. 256 or 360,480")


def check_rule(rule: str) -> tuple[str, int]:
    """("shorter" | "longer", side) of a resize rule such as "shorter:256".

    Raises:
        ValueError: naming the rule and the accepted forms.
    """
    kind, _, side = str(rule).partition(":")
    if kind not in RULES or not side.isdigit() or int(side) < 1:
        raise ValueError(f"resize rule {rule!r}: use shorter:N or longer:N (e.g. shorter:256)")
    return kind, int(side)


def apply_rule(rule: str, original: ImageShape, multiple: int) -> ImageShape:
    """The (H, W) a resize rule gives an image of `original` (H, W): the named side becomes N,
    the other keeps the aspect ratio; both are rounded to the nearest multiple of `multiple`
    (at least one multiple)."""
    kind, side = check_rule(rule)
    height, width = original
    reference = min(height, width) if kind == "shorter" else max(height, width)
    scale = side / reference

    def rounded(length: float) -> int:
        return max(multiple, round(length / multiple) * multiple)

    return rounded(height * scale), rounded(width * scale)


def check_multiple(shape: ImageShape, multiple: int, model: str) -> None:
    """Refuses a size the model cannot see: each side must be a multiple of its downsampling.

    Raises:
        ValueError: naming the size, the multiple and a rule that rounds for the user.
    """
    if shape[0] % multiple or shape[1] % multiple:
        raise ValueError(
            f"size {describe(shape)} does not fit {model}: both sides must be multiples of {multiple} "
            f"(its total downsampling); choose such a size, or a rule like --resize shorter:{max(min(shape), multiple)} "
            "that rounds them"
        )
