"""Gallery retrieval: the FAISS index file, search, and k-reciprocal re-ranking in O(N k) memory."""

import logging

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines name every CPU build it tries
