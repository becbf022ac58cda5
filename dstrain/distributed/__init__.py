"""Process plumbing: the launcher's environment, the rendezvous and process group, cross-rank agreement,
rank liveness (heartbeat) and failure reports, per-rank logs, stop signals, and DeepSpeed's op build locks.

Layered so nothing imports upward: `env` (what the launcher said) <- `rendezvous` <- `heartbeat` (its store
calls through `deadlinestore`, its messages from `verdicts`) <- `group` (start and leave the process group);
`collectives` needs only torch.distributed.
"""
