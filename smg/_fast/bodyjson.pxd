cpdef object parse_json(bytes body, Py_ssize_t large=*)
