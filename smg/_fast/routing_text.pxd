cdef enum:
    EP_GENERATE = 0
    EP_CHAT = 1
    EP_COMPLETIONS = 2
    EP_EMBEDDINGS = 3
    EP_RERANK = 4
    EP_CLASSIFY = 5
    EP_RESPONSES = 6
    EP_MESSAGES = 7
    EP_COUNT_TOKENS = 8

cpdef str routing_text(int endpoint, dict body)
cpdef tuple invalid_field(int endpoint, dict body)
cdef str routing_prompt(int endpoint, dict body, bint* is_prompt)
