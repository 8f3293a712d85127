"""Property-based API fuzzing from the server's own OpenAPI schema: never a 5xx."""

import re
import subprocess
import sys
from pathlib import Path


def test_no_server_errors_on_generated_requests(live):
    # A tenant key reaches the deep paths of /v1; the admin key those of /admin.
    for key in (live.keys["acme"], live.admin_key):
        result = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "run",
             f"{live.url}/openapi.json", "--checks", "not_a_server_error",
             "--header", f"Authorization: Bearer {key}", "--max-examples", "25",
             "--seed", "1", "--generation-deterministic", "--phases", "examples,fuzzing"],
            capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stdout[-4000:]
        generated = re.search(r"(\d+) generated", result.stdout)
        assert generated and int(generated.group(1)) > 100  # it really exercised the API
        print(f"schemathesis ({'tenant' if key in live.keys.values() else 'admin'} key): "
              f"{generated.group(0)} cases, no 5xx")
