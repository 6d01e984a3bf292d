# cython: language_level=3
"""Back-pressure between a client connection and the worker connection
relaying its response (see FlowControl)."""


cdef class ResponseSource:

    def __cinit__(self):
        self.deadline = 0.0

    cdef int client_lost(self) except -1:
        return 0

    cdef int client_pause(self) except -1:
        return 0

    cdef int client_resume(self) except -1:
        return 0

    cdef int expired(self, double now) except -1:
        return 0

    cdef int tick(self, double now) except -1:
        return 0

    cdef int body_available(self) except -1:
        return 0

    cdef int body_failed(self, int status, str code, str message) except -1:
        return 0


cdef class FlowControl:

    def __init__(self, transport):
        self.transport = transport
        self.read_paused = False
        self.write_paused = False
        self.source = None

    cdef int pause_reading(self) except -1:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        return 0

    cdef int resume_reading(self) except -1:
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        return 0

    cdef int pause_writing(self) except -1:
        self.write_paused = True
        if self.source is not None:
            self.source.client_pause()
        return 0

    cdef int resume_writing(self) except -1:
        self.write_paused = False
        if self.source is not None:
            self.source.client_resume()
        return 0
