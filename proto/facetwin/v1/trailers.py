"""Trailing metadata keys of facetwin.v1: part of the contract beside the messages, sent by the server and read by
the SDK (and by any client that wants to act on them)."""

# "1" on a stream the server took and ends because it drains: every frame it took was answered, so resending the
# frames after the last answer (to another replica, or to this one once it is back) is safe.
RECONNECT = "facetwin-reconnect"

# On RESOURCE_EXHAUSTED for an answer that only the work could size (an encoded JPEG or PNG over the message limit):
# its size in bytes. Sending the image's pixels instead, asking for the changed region only, avoids it.
ANSWER_BYTES = "facetwin-answer-bytes"
