"""Column layout of the arrays the scoring core reads, and the policy ids.

csrc/_score_c.pyx repeats these numbers as C constants; a test checks that the
compiled module reports the same layout.
"""

# Node signal matrix: one row per node.
COL_HEALTHY = 0  # 1 when the node takes traffic
COL_IN_FLIGHT = 1  # requests the router has sent and not finished
COL_QUEUE_DEPTH = 2  # requests the node reports as waiting for a slot
COL_SLOTS_TOTAL = 3  # parallel slots (llama-server -np, Ollama OLLAMA_NUM_PARALLEL)
COL_TTFT_MS = 4  # moving average of time to first token, NaN until measured
COL_DECODE_TPS = 5  # moving average of decode tokens per second, NaN until measured
COL_ERROR_RATE = 6  # moving average of failed requests, 0..1
COL_IS_GPU = 7  # 1 for a GPU node (from config)
COL_COST_WEIGHT = 8  # relative cost of using the node (from config), 1 by default
NODE_COLUMNS = 9

# Model state matrix: one row per node, for the requested model. NaN: unknown.
MODEL_LOADED = 0  # 1 when the model is loaded in the node's memory
MODEL_FITS = 1  # 0 when the model is larger than the node's memory
MODEL_TTFT_MS = 2  # moving average for this model on this node; NaN: use the node's
MODEL_DECODE_TPS = 3  # likewise for decode tokens per second
MODEL_COLUMNS = 4

# Request vector.
REQ_PROMPT_TOKENS = 0
REQ_MAX_TOKENS = 1
REQ_PRIORITY = 2  # 1 (batch) .. 10 (critical), 5 normal
REQ_WANTS_GPU = 3
REQ_AFFINITY_NODE = 4  # node holding this conversation's prompt cache, -1 for none
REQ_MODEL_LOAD_MS = 5  # expected time to load the model where it is not loaded
REQ_COLUMNS = 6

POLICY_ROUND_ROBIN = 0
POLICY_LEAST_LOADED = 1
POLICY_HEURISTIC = 2
POLICY_PREDICTED_LATENCY = 3

POLICY_IDS = {
    "round_robin": POLICY_ROUND_ROBIN,
    "least_loaded": POLICY_LEAST_LOADED,
    "sollol_heuristic": POLICY_HEURISTIC,
    "predicted_latency": POLICY_PREDICTED_LATENCY,
}

# The learned policy scores with a trained model (sollol/learning), not with
# the core above; until a model is loaded it falls back to predicted_latency.
LEARNED_POLICY = "learned"
LEARNED_FALLBACK_POLICY = "predicted_latency"
# The label a decision gets, in the history too, when the learned policy sends
# a request to a node other than its best so the history keeps covering it.
LEARNED_EXPLORE_POLICY = "learned:explore"
ROUTING_POLICIES = (*POLICY_IDS, LEARNED_POLICY)

# Stand-ins for signals not measured yet, so a new node is neither shunned nor
# flooded. These are rough estimates for a small model on a CPU node.
UNKNOWN_TTFT_MS = 200.0
UNKNOWN_DECODE_TPS = 20.0
UNKNOWN_PREFILL_TPS = 200.0
