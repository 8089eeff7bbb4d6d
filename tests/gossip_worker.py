"""One rank of the drop-in test job: the README's training loop with dsgd.Gossip, for a list of
configs. ``torchrun --standalone --nproc-per-node=4 tests/gossip_worker.py CONFIGS.json OUT``.

Every rank builds the same model, reads its own row of the shared (m, B, 5) batches through a
plain DataLoader, trains with torch.optim.SGD and writes ``OUT/<name>.rank<r>.pt`` with its
final weights, float buffers, consensus distance and averaged state. A config may make one
rank hang at one step (``"hang": {"rank": 1, "step": 5}``) to see the others give up.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import batches, mlp  # noqa: E402

import dsgd  # noqa: E402


def run(cfg: dict, out: Path, rank: int, world: int) -> None:
    model = mlp(cfg.get("batchnorm", False))
    if cfg.get("perturb"):  # different starting weights: Gossip starts everyone from rank 0's
        with torch.no_grad():
            for p in model.parameters():
                p.add_(rank)
    data = batches(world, cfg["steps"])
    x = torch.cat([xb[rank] for xb, _ in data])  # (steps * B, 5): this worker's samples in order
    y = torch.cat([yb[rank] for _, yb in data])
    loader = DataLoader(TensorDataset(x, y), batch_size=len(data[0][1][0]), shuffle=False)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg.get("momentum", 0.0))
    gossip = dsgd.Gossip(model, topology=cfg["topology"], algorithm=cfg.get("algorithm", "dsgd"),
                         gossip_every=cfg.get("gossip_every", 1),
                         timeout_s=cfg.get("timeout_s", 60))
    hang = cfg.get("hang") or {}  # {"rank": r, "step": t}: that rank stops responding there
    for xb, yb in loader:
        if hang.get("rank") == rank and hang.get("step") == gossip.step_count:
            time.sleep(3600)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        gossip.step(opt)
    sent = gossip.bytes_sent  # the training loop's gossip only
    torch.save({"w": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                "b": [b.clone() for b in model.buffers() if b.is_floating_point()],
                "consensus": gossip.consensus_distance(), "average": gossip.average_state(),
                "steps": gossip.step_count, "bytes_sent": sent},
               out / f"{cfg['name']}.rank{rank}.pt")


def main(argv: list[str]) -> int:
    configs = json.loads(Path(argv[0]).read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for cfg in configs:
        run(cfg, Path(argv[1]), dist.get_rank(), dist.get_world_size())
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
