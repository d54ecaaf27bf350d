"""The ONE client runner: run clients' tasks on a backend and apply their own upload stage.
The simulation pool calls it with a round's tasks, a deployed node's ClientApp with its one
task; the numbers are the same (tested: deployment == simulation)."""
from __future__ import annotations

import torch

from metafed import tree
from metafed.algorithms.base import LocalProgram
from metafed.backends.base import Backend, ClientTask
from metafed.client.reply import upload_of
from metafed.privacy.upload import UploadTransform, client_privacy_random, finish_upload


def run_clients(backend: Backend, program: LocalProgram, broadcast: dict, tasks: list[ClientTask], ids: list[int],
                rnd: int, upload: UploadTransform | None = None,
                insecure_privacy_seed: int | None = None) -> tuple[dict, torch.Tensor]:
    """Run ``tasks`` (clients ``ids``) on ``backend``; returns (outputs stacked [C, ...] in
    task order, mean training loss [C]). With ``upload`` (local DP) each client's upload is
    finished (clipped and noised) with that client's own privacy randomness, before it
    leaves the client: fresh OS randomness, or the seeded stream behind the loudly named
    ``insecure_privacy_seed``."""
    outputs, losses = backend.run(program, broadcast, tasks)
    if upload is not None and not upload.identity:
        sent = upload_of(outputs)
        rows = [finish_upload(tree.nested_index(sent, i), upload, client_privacy_random(insecure_privacy_seed, rnd, c))
                for i, c in enumerate(ids)]
        outputs = {**outputs, **tree.nested_stack(rows)}
    return outputs, losses
