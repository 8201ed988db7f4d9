"""llama.cpp RPC shard groups: one model spread over ggml-rpc-server workers.

``config`` parses ``[[shard_groups]]``, ``rpc`` speaks the protocol's HELLO,
``placement`` splits the model by the workers' memory, ``supervisor`` runs a
group, and ``commands`` is ``sollol shard up | down | status``.
"""
