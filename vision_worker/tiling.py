"""InternVL dynamic tiling: which grid of square tiles an image is cut into, and where each tile lies.

An image of width w and height h is resized to a grid of `cols x rows` tiles of `tile_size` pixels and cut
row-major; when the grid has more than one tile and the thumbnail is enabled, a `tile_size` resize of the whole
image follows as the LAST tile. The grid is the candidate whose `cols / rows` is closest to `w / h`; candidates are
all grids with `min_tiles <= cols * rows <= max_tiles`, visited by increasing tile count. On an exact tie the
later candidate wins only when the image area exceeds half of that grid's pixel area.

The visiting order among grids with the SAME tile count differs between the two references and changes the
outcome on rare exact ties (e.g. min=max=4 and a 5:2 image: (4, 1) or (2, 2)):
- "chat": the model card's `dynamic_preprocess` (and vLLM's `internvl.py`) sorts a Python set, so equal counts
  keep CPython's set iteration order. We build the same set the same way to inherit that order.
- "hf": transformers' GotOcr2 `get_optimal_tiled_canvas` sorts a list built cols-major, rows-minor (stable sort).

Everything here is pure and cheap: `tile_count` lets admission control price an image from its header size
before any pixel is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

GridOrder = Literal["chat", "hf"]
Grid = tuple[int, int]  # (cols, rows)
Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels of the resized canvas


@lru_cache(maxsize=256)
def candidate_grids(min_tiles: int, max_tiles: int, order: GridOrder = "chat") -> tuple[Grid, ...]:
    """All (cols, rows) with `min_tiles <= cols * rows <= max_tiles`, by increasing tile count, in `order`."""
    if order == "chat":
        unordered = {
            (cols, rows)
            for budget in range(min_tiles, max_tiles + 1)
            for cols in range(1, budget + 1)
            for rows in range(1, budget + 1)
            if min_tiles <= cols * rows <= max_tiles
        }
        return tuple(sorted(unordered, key=_tile_product))
    if order == "hf":
        listed = [
            (cols, rows)
            for cols in range(1, max_tiles + 1)
            for rows in range(1, max_tiles + 1)
            if min_tiles <= cols * rows <= max_tiles
        ]
        return tuple(sorted(listed, key=_tile_product))
    raise ValueError(f"unknown grid order {order!r}")


def choose_grid(
    width: int, height: int, min_tiles: int, max_tiles: int, tile_size: int, order: GridOrder = "chat"
) -> Grid:
    """(cols, rows) of the grid the reference picks for a `width x height` image; (1, 1) if no grid fits."""
    _check_size(width, height)
    aspect_ratio = width / height
    area = width * height
    best_grid: Grid = (1, 1)
    best_distance = float("inf")
    for cols, rows in candidate_grids(min_tiles, max_tiles, order):
        distance = abs(aspect_ratio - cols / rows)
        if distance < best_distance:
            best_distance = distance
            best_grid = (cols, rows)
        elif distance == best_distance and area > 0.5 * tile_size * tile_size * cols * rows:
            best_grid = (cols, rows)
    return best_grid


@dataclass(frozen=True, slots=True)
class TilePlan:
    """How one image is tiled: the grid and whether a whole-image thumbnail tile follows it."""

    grid: Grid
    thumbnail: bool

    @property
    def num_tiles(self) -> int:
        return self.grid[0] * self.grid[1] + int(self.thumbnail)


def plan_tiles(
    width: int,
    height: int,
    min_tiles: int,
    max_tiles: int,
    tile_size: int,
    use_thumbnail: bool,
    order: GridOrder = "chat",
) -> TilePlan:
    """The reference's grid for a `width x height` image, plus a thumbnail when the grid has several tiles."""
    grid = choose_grid(width, height, min_tiles, max_tiles, tile_size, order)
    return TilePlan(grid=grid, thumbnail=use_thumbnail and grid[0] * grid[1] != 1)


def tile_count(
    width: int,
    height: int,
    min_tiles: int,
    max_tiles: int,
    tile_size: int,
    use_thumbnail: bool,
    order: GridOrder = "chat",
) -> int:
    """Number of tiles (thumbnail included) a `width x height` image becomes."""
    return plan_tiles(width, height, min_tiles, max_tiles, tile_size, use_thumbnail, order).num_tiles


def tile_boxes(cols: int, rows: int, tile_size: int) -> list[Box]:
    """Crop boxes of the grid tiles in the `(cols * tile_size) x (rows * tile_size)` canvas, row-major."""
    return [
        (col * tile_size, row * tile_size, (col + 1) * tile_size, (row + 1) * tile_size)
        for row in range(rows)
        for col in range(cols)
    ]


def _tile_product(grid: Grid) -> int:
    return grid[0] * grid[1]


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
