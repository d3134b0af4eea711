"""Names and constants of the BB3 deployment release, in one place.

Why a module of its own: the reader, the stream semantics, the feedback policy,
the synthetic release and the TFDS features must all agree on the same field
names and value spellings; a typo in one of them would silently turn every
example "unlabeled". Sources: the release's data card and ParlAI's
``projects/bb3x/tasks`` loader.
"""

from __future__ import annotations

# --- files and splits -------------------------------------------------------
NUM_CHUNKS = 100
CHUNK_TEMPLATE = "release_data_{:02d}.jsonl"
CHUNK_PATTERN = r"(?:^|/)release_data_(\d{2})\.jsonl$"
TARBALL_NAME = "bb3_demo_chunks.tgz"
TARBALL_SHA256 = "a901e121f336504fa559992d9196124642fb8e1cd682bc7216f26abdb0d4900e"
RELEASE_URL = "http://parl.ai/downloads/bb3x/bb3_demo_chunks.tgz"

# Chunk ids of each split, exactly as the reference loader assigns them.
SPLIT_CHUNKS: dict[str, tuple[int, ...]] = {
    "test": tuple(range(0, 3)),
    "valid": tuple(range(3, 6)),
    "train": tuple(range(6, 100)),
}
SPLITS = ("train", "valid", "test")

# --- conversation and message keys --------------------------------------------
CONVERSATION_KEYS = ("user_pseudo_id", "chat_id", "message_history")

# Sender spellings: the reference loader compares with "bot"/"human", the data
# card writes "Chatbot"/"Human". Both are accepted and normalised to these.
BOT = "bot"
HUMAN = "human"
SENDER_ALIASES = {
    "bot": BOT,
    "chatbot": BOT,
    "human": HUMAN,
}

SAFETY_OK = "__ok__"
SAFETY_KEYS = ("duo_safety", "string_matcher")

# The reward field is a string like
# "Predicted class: __ok__ with probability: 0.93".
REWARD_PATTERN = r"^\s*Predicted class:\s*(\S+)\s+with probability:\s*([0-9.eE+-]+)\s*$"
REWARD_OK = "__ok__"
REWARD_NOT_OK = "__not_ok__"

# Bot-message keys and their JSON types (None means "any JSON value").
BOT_MESSAGE_FIELDS: dict[str, type | tuple[type, ...] | None] = {
    "bot_message_id": str,
    "isLiked": bool,
    "isDisliked": bool,
    "dislike_type": str,
    "memories": list,
    "memory_decision": str,
    "memory_knowledge": str,
    "search_decision": str,
    "search_query": str,
    "search_knowledge": str,
    "search_knowledge_doc_titles": list,
    "search_knowledge_doc_content": list,
    "search_knowledge_doc_urls": list,
    "isSafetyControlledResponse": bool,
    "previous_interaction_failure": str,
    "from_model_crash": bool,
}
HUMAN_MESSAGE_FIELDS: dict[str, type | tuple[type, ...] | None] = {
    "human_message_id": str,
    "isDislikeFeedback": bool,
}
COMMON_MESSAGE_FIELDS: dict[str, type | tuple[type, ...] | None] = {
    "text": str,
    "sender": str,
    "safety": dict,
    "reward": str,
    "mturk": dict,
}

MEMORY_DECISIONS = ("access memory", "do not access memory")
SEARCH_DECISIONS = ("search", "do not search")
INTERACTION_FAILURES = ("unsafe_Human", "unsafe_BlenderBot3", "unsafe_model_crash")

# Dislike reasons a user could pick in the BB3 demo UI. The demo offered
# off-topic, nonsensical, rude, spam-like/looping and other; the exact stored
# strings are UNVERIFIED, so the feedback policy never depends on them except
# for the two canned-response values, which the data card names exactly.
DISLIKE_TYPES = ("off_topic", "nonsensical", "rude", "looping", "other")
SENSITIVE_DISLIKE_TYPES = ("agree_sensitive", "disagree_sensitive")

# Crowdworker annotation categories (paper, Table 9). Key spellings in the real
# release are UNVERIFIED; the policy takes them from its config.
MTURK_GOOD = "good"
MTURK_BAD = ("inappropriate", "off_topic", "nonsensical", "ignoring_last_turn", "repeating", "other")

# --- the six reference streams ----------------------------------------------------
STREAMS = (
    "bot",
    "human",
    "filter_adversarial_humans_bot",
    "filter_adversarial_humans_human",
    "crowdworkers_bot",
    "crowdworkers_human",
)

# Published example counts of the reference loader on the real release
# (train, valid, test); used by tests of the loader semantics' documentation
# and printed by `stats` for comparison.
REFERENCE_COUNTS: dict[str, tuple[int, int, int]] = {
    "bot": (2_682_397, 84_016, 85_127),
    "human": (2_605_234, 81_291, 82_336),
    "filter_adversarial_humans_bot": (773_828, 23_635, 22_759),
    "filter_adversarial_humans_human": (752_566, 22_898, 21_924),
    "crowdworkers_bot": (14_324, 567, 582),
    "crowdworkers_human": (6_672, 268, 232),
}

# --- feedback classes (CRINGE convention) ----------------------------------------
POSITIVE = 1
NEGATIVE = 0
UNLABELED = -1
FEEDBACK_NAMES = {POSITIVE: "positive", NEGATIVE: "negative", UNLABELED: "unlabeled"}

# --- prepared example ------------------------------------------------------------
# Every prepared example (TFDS record) has these keys. Text is UTF-8 bytes when
# read back through ``tfds.data_source``. Kept to the few fields the training
# path reads plus one lossless JSON of the label message: every extra TFDS
# feature costs serialisation time on millions of examples, and the typed
# label fields are derived from ``label_info`` on demand
# (``streams.label_fields``).
EXAMPLE_KEYS = (
    "context",  # previous utterances joined with "\n" (reference framing)
    "label",  # the label message's text
    "feedback",  # int32: 1 positive, 0 negative, -1 unlabeled
    "feedback_source",  # which policy rule decided the class
    "chat_id",
    "user_pseudo_id",
    "message_index",  # int32 index of the label message in message_history
    "adversarial_human",  # bool: any human message in the conversation unsafe
    "label_info",  # the whole label message dict as JSON (lossless, sender normalised)
)
