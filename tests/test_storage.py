"""Where a job writes is checked before it starts."""
import pytest

from pipelines.errors import PipelineError, root_cause
from pipelines.storage import check_writable


def test_a_folder_is_created_and_proved_writable_leaving_nothing_behind(tmp_path):
    assert check_writable(tmp_path / "a" / "b", "paths.datasets_root") == tmp_path / "a" / "b"
    assert list((tmp_path / "a" / "b").iterdir()) == []


def test_a_folder_that_cannot_be_made_is_one_error_naming_the_key(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(PipelineError, match=rf"cannot write to paths.checkpoints_root {tmp_path}/file/ck: Not a "
                                            r"directory$"):
        check_writable(tmp_path / "file" / "ck", "paths.checkpoints_root")


def test_the_root_cause_is_the_innermost_error():
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as inner:
            raise RuntimeError("Job aborted due to stage failure") from inner
    except RuntimeError as outer:
        assert root_cause(outer) == "OSError: [Errno 28] No space left on device"
