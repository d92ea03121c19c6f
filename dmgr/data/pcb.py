"""The procedural PCB domain: bare boards and the six PKU-Market-PCB defect classes, with exact masks.

    board = make_board(seed=3, size=256)            # board.image: (256, 256, 3) uint8, board.traces, .pads ...
    image, mask, box = add_defect(board, "short", seed=0, center=(128, 128))

Pieces: `layout` (geometry in design units), `render` (layers -> photograph), `board`, `defects`.
"""

from dmgr.data.board import Board, make_board
from dmgr.data.defects import CLASS_NAMES, add_defect, class_id_of
from dmgr.data.shapes import Mark, Pad, Trace

__all__ = ["CLASS_NAMES", "Board", "Mark", "Pad", "Trace", "add_defect", "class_id_of", "make_board"]
