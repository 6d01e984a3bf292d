from smg._fast.request cimport Request
from smg._fast.routes cimport Route
from smg._fast.cycle cimport Connection, RequestCycle


cdef class ServerCore:
    """What every client connection of one listener shares: the routes and
    how a request is classified against them (route, method, credentials),
    the limits, the open connections."""
    cdef public dict routes              # exact path -> Route
    cdef public list prefix_routes       # [(prefix, Route)]
    cdef public Route not_found
    cdef public object loop
    cdef public long long max_payload
    # --max-buffered-request-bytes: a body larger than this streams to the
    # worker when its route can take it so (-1: never);
    # --stream-body-stall-timeout-secs: a streamed body idle this long is given up
    cdef public long long max_buffered_body
    cdef public double body_stall_timeout
    cdef public long long max_header_bytes
    cdef public int max_headers
    cdef public int max_pipeline
    cdef public double header_timeout
    cdef public double idle_timeout
    cdef public bytes api_key            # the serving key (--api-key) or None
    cdef public bytes admin_api_key
    cdef public set connections
    cdef public bytes date_header
    cdef public bint shutting_down
    cdef public long max_connections      # client connections at most (file descriptors); 0: no limit
    cdef public long long shed_total       # idle keep-alive connections closed to stay under it
    cdef public dict id_headers            # --request-id-headers: lowercase name -> order; None: the defaults
    cdef public dict key_headers           # --routing-key-headers: lowercase name -> order; None: X-SMG-Routing-Key
    cdef public frozenset cors_origins     # --cors-allowed-origins (None: no CORS)
    cdef public bint cors_any              # '*': any origin
    cdef double shed_logged_at

    cpdef Route resolve(self, str path)
    cdef int classify(self, Request req) except -1
    cdef bint cors_allows(self, Request req)


cdef class ClientConnection(Connection):
    cdef ServerCore core
    cdef object parser
    cdef Request parsing                 # request whose bytes are being parsed
    cdef object pending                  # deque of complete requests waiting their turn
    cdef long long pending_bytes         # body bytes of the requests waiting in `pending`
    cdef bint lingering                  # answered and half-closed: dropping input until the client closes
    cdef double linger_until
    cdef bint close_after
    cdef int error_status                # set by a parser callback that refuses the request
    cdef str error_code
    cdef str error_message
    cdef double last_activity
    cdef double head_started
    cdef public object peer

    cdef int configured_header(self, Request req, bytes lname, bytes value) except -1
    cdef int begin(self, Request req, bint streaming=*) except -1
    cdef int serve(self, RequestCycle cycle) except -1
    cdef int linger(self) except -1
    cdef bint may_read_more(self)
    cdef bint may_stream(self, Request req)
    cdef int refuse(self, int status, str code, str message) except -1
    cdef int check_timeouts(self, double now) except -1
