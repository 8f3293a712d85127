"""Corruption: while the server runs, damage what it keeps on disk (a byte flipped, or the file
cut to half, by turns each round) and check that the damage is found, that only the damaged
thing's own request fails (clearly), and that every other tenant is served as before.

Three things are damaged each round, each the file of its own tenant:
- cache: the serving-cache entry (lora/packed.py) of t00's adapter. Its next load must notice
  (the entry's sha256, or an unreadable file) and rebuild it from the sealed artifact: t00's
  answer is the same as before, and the entry holds the same tensors again.
- artifact: the sealed weights of t01's serving version. The serving-cache entry made from it
  is removed first (as the cache's own eviction would), so that the next load must read the
  artifact: the AEAD tag fails, t01's request is a clear error (an error body, no hang), the
  home check names the version; pushing the same adapter again repairs it, and t01 is served
  as before. No restart is needed.
- vault: t02's uploaded training file. Reading it back (GET /v1/files/{id}/content) must be a
  clear error, and the home check names it; the file is then put back as it was.
The server holds one adapter in RAM and on the device (--max-cpu-loras 1), so each request to
another tenant evicts the last one: every load after a damage reads the disk. After each damage
all the other tenants must answer 200, the same answer as before any damage (greedy).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from safetensors import safe_open

from loraplex.faults.checks import home_problems
from loraplex.faults.crash import _jsonl
from loraplex.faults.harness import ADAPTER, FaultHome, ServeProcess, admin_headers, make_home
from loraplex.home import ADAPTER_CACHE_DIR
from loraplex.registry.artifacts import ADAPTER_FILES, ARTIFACTS_DIR
from loraplex.vault.artifacts import SEALED_SUFFIX
from loraplex.vault.store import TENANTS_DIR, VAULT_DIR

KINDS = ("cache", "artifact", "vault")
TARGETS = {"cache": "t00", "artifact": "t01", "vault": "t02"}  # t03 is never damaged
NUM_TENANTS = 4
SERVE_ARGS = ("--max-loras", "1", "--max-cpu-loras", "1", "--prewarm", "none")
REQUEST_TIMEOUT_S = 60  # a damaged adapter's request must be answered (an error) by then


@dataclass
class CorruptionReport:
    rounds: int
    damaged: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    detected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    # cache: the right answer and the entry rebuilt; artifact, vault: a clear error
    handled: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    repaired: int = 0  # artifacts served again after pushing the adapter again
    others_served: int = 0  # answers of undamaged tenants, 200 and as before
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        every_round = dict.fromkeys(KINDS, self.rounds)
        return (not self.problems and self.damaged == every_round
                and self.detected == every_round and self.handled == every_round
                and self.repaired == self.rounds
                and self.others_served == self.rounds * len(KINDS) * (NUM_TENANTS - 1))

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def damage(path: Path, how: str) -> None:
    """"flip": one bit of the byte in the middle; "cut": the file truncated to half."""
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        del data[len(data) // 2:]
    path.write_bytes(bytes(data))


def _tensors(path: Path) -> dict:
    """The entry's metadata and tensors, copied (safetensors' are views of the mapped file, which
    the damage then changes or cuts under them)."""
    with safe_open(path, framework="pt") as f:
        return {"metadata": f.metadata(),
                **{name: f.get_tensor(name).clone() for name in f.keys()}}


def _same_entry(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k] == b[k] if k == "metadata" else bool((a[k] == b[k]).all()) for k in a)


def _clear_error(response: httpx.Response) -> bool:
    """An error status with an OpenAI error body that says something (not a traceback)."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return False
    return response.status_code >= 400 and bool(message) and "Traceback" not in response.text


class Damages:
    """The round's damages and checks against one server."""

    def __init__(self, fh: FaultHome, server: ServeProcess, report: CorruptionReport):
        self.fh, self.report = fh, report
        self.url, self.admin = server.url, admin_headers(fh)
        self.client = httpx.Client(timeout=REQUEST_TIMEOUT_S)
        self.references = {tenant: self.answer(tenant).json()["choices"][0]["text"]
                           for tenant in fh.tenants}
        target = TARGETS["vault"]
        upload = self.client.post(f"{self.url}/v1/files", data={"purpose": "fine-tune"},
                                  files={"file": ("train.jsonl", _jsonl(8, 0))},
                                  headers=self._key(target))
        self.file_id = upload.json()["id"]
        self.vault_file = self.fh.home / VAULT_DIR / TENANTS_DIR / target / self.file_id / "v1.enc"

    def _key(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.fh.keys[tenant]}"}

    def answer(self, tenant: str) -> httpx.Response:
        return self.client.post(f"{self.url}/v1/completions", json={
            "model": ADAPTER, "prompt": "Hi", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}, headers=self._key(tenant))

    def is_served_as_before(self, tenant: str) -> bool:
        response = self.answer(tenant)
        return (response.status_code == 200
                and response.json()["choices"][0]["text"] == self.references[tenant])

    def others_served(self, damaged: str) -> None:
        for tenant in self.fh.tenants:
            if tenant == damaged:
                continue
            if self.is_served_as_before(tenant):
                self.report.others_served += 1
            else:
                self.report.problems.append(f"{tenant} not served as before after {damaged}'s "
                                            "damage")

    def _cache_entry(self, tenant: str) -> Path:
        entries = list((self.fh.home / ADAPTER_CACHE_DIR / tenant).glob("*.safetensors"))
        if len(entries) != 1:
            raise RuntimeError(f"{tenant}: {len(entries)} serving-cache entries, expected one")
        return entries[0]

    def _is_named(self, words: str) -> bool:
        return any(words in problem for problem in home_problems(self.fh.home)["problems"])

    def cache(self, how: str) -> None:
        tenant = TARGETS["cache"]
        entry = self._cache_entry(tenant)  # written by its first load (the references)
        intact = _tensors(entry)
        self.answer("t03")  # evicts it from RAM: its next load reads the entry
        damage(entry, how)
        self.report.damaged["cache"] += 1
        if self.is_served_as_before(tenant):
            self.report.handled["cache"] += 1
        else:
            self.report.problems.append(f"{tenant}: a wrong answer from a {how} cache entry")
        if entry.exists() and _same_entry(_tensors(entry), intact):
            self.report.detected["cache"] += 1
        else:
            self.report.problems.append(f"{tenant}: the {how} cache entry was not rebuilt")
        self.others_served(tenant)

    def artifact(self, how: str) -> None:
        tenant = TARGETS["artifact"]
        self._cache_entry(tenant).unlink()
        self.answer("t03")  # evicts it from RAM: its next load reads the artifact
        sealed = next((self.fh.home / ARTIFACTS_DIR / tenant).glob(
            f"*/adapter_model.safetensors{SEALED_SUFFIX}"))
        damage(sealed, how)
        self.report.damaged["artifact"] += 1
        if self._is_named(f"{tenant}/{ADAPTER} v1: unreadable"):
            self.report.detected["artifact"] += 1
        else:
            self.report.problems.append(f"{tenant}: the home check missed a {how} artifact")
        response = self.answer(tenant)
        if _clear_error(response):
            self.report.handled["artifact"] += 1
        else:
            self.report.problems.append(f"{tenant}: a {how} artifact gave {response.status_code}"
                                        f" {response.text[:300]}")
        self.others_served(tenant)
        src = self.fh.adapter_dirs[(tenant, 1)]
        files = {name: (name, (src / name).read_bytes()) for name in ADAPTER_FILES}
        self.client.post(f"{self.url}/admin/tenants/{tenant}/adapters/{ADAPTER}/versions",
                         files=files, headers=self.admin)
        if self.is_served_as_before(tenant):
            self.report.repaired += 1
        else:
            self.report.problems.append(f"{tenant}: not served as before after a re-push")

    def vault(self, how: str) -> None:
        tenant = TARGETS["vault"]
        intact = self.vault_file.read_bytes()
        damage(self.vault_file, how)
        self.report.damaged["vault"] += 1
        if self._is_named(f"dataset {tenant}/{self.file_id} v1: does not decrypt"):
            self.report.detected["vault"] += 1
        else:
            self.report.problems.append(f"{tenant}: the home check missed a {how} vault file")
        response = self.client.get(f"{self.url}/v1/files/{self.file_id}/content",
                                   headers=self._key(tenant))
        if _clear_error(response):
            self.report.handled["vault"] += 1
        else:
            self.report.problems.append(f"{tenant}: a {how} vault file gave "
                                        f"{response.status_code} {response.text[:300]}")
        self.others_served(tenant)
        self.vault_file.write_bytes(intact)


def run_corruption(root: Path, *, rounds: int = 3, model_dir: Path | None = None
                   ) -> CorruptionReport:
    started = time.monotonic()
    fh = make_home(root, NUM_TENANTS, model_dir)
    report = CorruptionReport(rounds)
    with ServeProcess(fh, *SERVE_ARGS) as server:
        damages = Damages(fh, server, report)
        for number in range(rounds):
            how = ("flip", "cut")[number % 2]
            for kind in KINDS:
                getattr(damages, kind)(how)
        damages.client.close()
    report.problems += home_problems(fh.home)["problems"]  # every damage undone by now
    report.seconds = round(time.monotonic() - started, 1)
    return report
