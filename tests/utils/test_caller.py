"""Where our warnings point: the caller of the outermost frame of the package."""

from __future__ import annotations

import os

from blob_lora.utils.caller import outside_stacklevel


def test_a_frame_from_a_path_that_cannot_be_resolved_does_not_break_the_walk(tmp_path):
    """A frame's file under a symlink loop made ``Path.resolve`` raise, which would have
    ended the call that was about to warn."""
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    code = compile("level = outside_stacklevel()", str(loop / "x.py"), "exec")
    scope = {"outside_stacklevel": outside_stacklevel}
    exec(code, scope)
    assert scope["level"] == 2  # the asking frame is taken as ours: its caller, this test
