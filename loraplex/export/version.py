"""One registry version as GGUF files: what `loraplex export gguf` and the console's exports run.

The artifact is sealed at rest: the exporter reads a decrypted copy in a private temporary
folder (in RAM where there is one), gone as soon as the GGUF is written.
"""

from pathlib import Path

from loraplex.export.gguf import ExportResult, export_adapter, export_merged
from loraplex.registry import Version
from loraplex.vault.artifacts import ArtifactSealer, materialized


def export_version(sealer: ArtifactSealer, model_dir: Path, tenant: str, version: Version,
                   out: Path, dtype: str, *, adapter_only: bool, base_gguf: str | None = None,
                   force: bool = False) -> ExportResult:
    """The base model with `version` merged in, or (adapter_only) the adapter alone for a base
    GGUF that the Modelfile's FROM names (`base_gguf`, default ./<model>.gguf beside `out`)."""
    label = f"{tenant}/{version.adapter_name}@{version.label}"
    reader = sealer.reader(tenant, version.artifact_path)
    with materialized(reader) as adapter_dir:
        if adapter_only:
            return export_adapter(model_dir, adapter_dir, out, dtype, name=label, force=force,
                                  base_gguf=base_gguf or f"./{model_dir.name}.gguf")
        return export_merged(model_dir, out, dtype, adapter_dir,
                             name=f"{model_dir.name}+{label}", force=force)
