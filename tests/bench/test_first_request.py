"""python -m loraplex.bench.first_request on the tiny model, and its usage errors."""

import pytest

from loraplex.bench import first_request
from loraplex.faults.tiny_model import write_tiny_model
from tests.bench.usage import usage_error


def test_a_published_version_is_loaded_before_its_first_request(tmp_path):
    model = write_tiny_model(tmp_path / "model")
    result = first_request.run(str(model), 2, 8, "float32", tmp_path, restarts=1, max_loras=1)
    print(result)
    published, restarted = result["published"], result["after_restart"]
    assert published["rounds"] == 2 and restarted["rounds"] == 1
    # Pre-warm read every version from disk at publish and at start: no request waited for it.
    assert published["loads_waited_for"] == 0 and restarted["loads_waited_for"] == 0
    # One slot, and the other tenant's request took it: every first request copied its
    # adapter in, timed by the server.
    for row in result["rounds"]["published"] + result["rounds"]["after_restart"]:
        assert row["slot_activations"] == 1 and row["adapter_ms"] == row["slot_activate_ms"] > 0


@pytest.mark.parametrize("args", [["--versions", "0"], ["--restarts", "0"], ["--rank", "-1"],
                                  ["--max-loras", "0"]])
def test_bad_options_are_a_usage_error_not_a_traceback(args, monkeypatch, capsys):
    message = usage_error(first_request.main, ["first_request", *args], monkeypatch, capsys)
    assert "must be at least 1" in message
