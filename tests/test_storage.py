"""Atomic writes: the finished file has the mode a new file gets, not the temporary file's owner-only one."""

import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_file_written_atomically_gets_the_mode_the_umask_gives_new_files(umask, mode, tmp_path):
    script = (
        "import os, sys; os.umask(int(sys.argv[1], 8)); from pathlib import Path; "
        "from headstart.infra.storage import write_json_atomic; "
        "print(oct(os.stat(write_json_atomic(Path(sys.argv[2]), {'a': 1})).st_mode & 0o777))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, oct(umask), str(tmp_path / "x.json")],
        cwd=PROJECT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == oct(mode)
