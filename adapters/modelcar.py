"""The ``package`` step: a trained model pushed as a KServe modelcar, named by digest.

The image is built by loaders/modelcar.py (the model under ``/models``); the step's
result is ``oci://registry/repository@sha256:...``, which a ``deploy`` step loads into
the model server (locally) or names as an InferenceService's ``storageUri`` (rendered).
"""

from __future__ import annotations

from pathlib import Path

from meshserve.adapters.settings import AdaptersSettings


def push_modelcar(model_dir: Path, image: str, settings: AdaptersSettings) -> str:
    """Build and push ``model_dir`` as ``image`` (oci://registry/repository:tag); its digest reference."""
    from meshserve.loaders.modelcar import build_and_push
    from meshserve.loaders.oci import Reference, RegistryClient

    ref = Reference.parse(image)
    credentials = None
    if settings.registry_username:
        password = settings.registry_password.get_secret_value() if settings.registry_password else ""
        credentials = (settings.registry_username, password)
    with RegistryClient(ref.registry, insecure=settings.registry_insecure, credentials=credentials) as client:
        digest = build_and_push(model_dir, image, client)
    return str(Reference(ref.registry, ref.repository, None, digest))
