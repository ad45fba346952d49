/* tunload: HTTP/1.1 keep-alive requests through long-lived CONNECT tunnels, one thread, epoll.
 *
 * Why it exists: hey is the only packaged load generator that opens CONNECT tunnels, and it
 * speaks TLS inside them. On the bench's one load core, hey and nginx's TLS cost about twice a
 * proxy's work per request, so a long-lived-tunnel rate measured with hey is the load core's,
 * whatever the proxy does. This client costs a few microseconds a request, so the rate it
 * reads is bound by the proxy. The proxy relays the tunnel's bytes untouched either way.
 *
 *   tunload PROXY TARGET PATH CONNECTIONS SECONDS LIMIT
 *
 * PROXY is IPv4:port, or "-" to send the requests to TARGET directly (the no-proxy baseline).
 * Each connection sends CONNECT TARGET and waits for a 2xx; once every connection has its
 * tunnel, the clock starts and each connection sends "GET PATH" and the next when the answer
 * (Content-Length framed) is complete, until SECONDS have passed or LIMIT answers came. It
 * prints one line, BENCH-TUNLOAD key=value ..., and exits 0; any failure to open a tunnel, a
 * closed connection or a response it cannot frame prints a message and exits 1.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF 65536
#define BUCKET_US 10   /* latency histogram: 10 us buckets up to 1 s */
#define BUCKETS 100000
#define SETUP_SECONDS 15.0

enum { OPENING, READY };

struct conn {
    int fd;
    int state;
    double sent;   /* when the request in flight was sent */
    size_t len;
    char buf[BUF];
};

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int fail(const char *what, const char *detail) {
    fprintf(stderr, "tunload: %s: %s\n", what, detail);
    return 1;
}

static int parse_address(const char *text, struct sockaddr_in *out) {
    char host[64];
    const char *colon = strrchr(text, ':');
    if (colon == NULL || (size_t)(colon - text) >= sizeof host) return -1;
    memcpy(host, text, (size_t)(colon - text));
    host[colon - text] = '\0';
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end != '\0' || port < 1 || port > 65535) return -1;
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    out->sin_port = htons((unsigned short)port);
    return inet_pton(AF_INET, host, &out->sin_addr) == 1 ? 0 : -1;
}

/* Content-Length of the head in buf[0, head_len), -1 when it has none (chunked or unframed). */
static long content_length(const char *buf, size_t head_len) {
    const char *p = memchr(buf, '\n', head_len);
    while (p != NULL && (size_t)(p + 1 - buf) < head_len) {
        p++;
        size_t left = head_len - (size_t)(p - buf);
        if (left > 15 && strncasecmp(p, "content-length:", 15) == 0) return strtol(p + 15, NULL, 10);
        p = memchr(p, '\n', left);
    }
    return -1;
}

static double percentile(const long *hist, long total, double q) {
    long want = (long)(q * (double)total), seen = 0;
    for (int i = 0; i < BUCKETS; i++) {
        seen += hist[i];
        if (seen > want) return (double)(i * BUCKET_US + BUCKET_US / 2) / 1e3;
    }
    return (double)(BUCKETS * BUCKET_US) / 1e3;
}

/* Every connection's first request, sent at start; nonzero (and a message) on failure. */
static int first_requests(struct conn *conns, int n, double start, const char *request, int len) {
    for (int i = 0; i < n; i++) {
        conns[i].sent = start;
        if (write(conns[i].fd, request, (size_t)len) != len) return fail("write", strerror(errno));
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: tunload PROXY|- TARGET PATH CONNECTIONS SECONDS LIMIT\n");
        return 2;
    }
    int direct = strcmp(argv[1], "-") == 0;
    const char *target = argv[2], *path = argv[3];
    int n = atoi(argv[4]);
    double seconds = atof(argv[5]);
    long limit = atol(argv[6]);
    struct sockaddr_in proxy, upstream;
    if ((!direct && parse_address(argv[1], &proxy) != 0) || parse_address(target, &upstream) != 0)
        return fail("not an IPv4 address:port", direct ? target : argv[1]);
    if (n < 1 || n > 4096 || seconds <= 0 || limit < 1) return fail("bad arguments", argv[4]);

    char opening[512], request[512];
    int opening_len = snprintf(opening, sizeof opening,
                               "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target);
    int request_len = snprintf(request, sizeof request,
                               "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: tunload\r\n\r\n",
                               path, target);
    long *hist = calloc(BUCKETS, sizeof *hist);
    struct conn *conns = calloc((size_t)n, sizeof *conns);
    int ep = epoll_create1(0);
    if (hist == NULL || conns == NULL || ep < 0) return fail("setup", strerror(errno));

    int ready = 0;
    double start = 0, end = 0, setup_end = now() + SETUP_SECONDS;
    for (int i = 0; i < n; i++) {
        struct conn *c = &conns[i];
        int one = 1;
        c->fd = socket(AF_INET, SOCK_STREAM, 0);
        if (c->fd < 0) return fail("socket", strerror(errno));
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct sockaddr_in *to = direct ? &upstream : &proxy;
        if (connect(c->fd, (struct sockaddr *)to, sizeof *to) != 0)
            return fail("connect", strerror(errno));
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) != 0) return fail("epoll_ctl", strerror(errno));
        c->state = direct ? READY : OPENING;
        if (direct) ready++;
        else if (write(c->fd, opening, (size_t)opening_len) != opening_len)
            return fail("write CONNECT", strerror(errno));
    }
    long ok = 0, bad_status = 0;
    if (ready == n) {  /* direct: no tunnels to wait for */
        start = now();
        end = start + seconds;
        if (first_requests(conns, n, start, request, request_len) != 0) return 1;
    }
    struct epoll_event events[256];
    for (;;) {
        int k = epoll_wait(ep, events, 256, 200);
        if (k < 0) {
            if (errno == EINTR) continue;
            return fail("epoll_wait", strerror(errno));
        }
        double t = now();
        if (ready < n && t > setup_end) return fail("tunnels", "not all open within 15 s");
        if (ready == n && (t >= end || ok + bad_status >= limit)) break;
        for (int j = 0; j < k; j++) {
            struct conn *c = events[j].data.ptr;
            ssize_t got = read(c->fd, c->buf + c->len, BUF - c->len);
            if (got == 0) return fail("read", "the proxy or upstream closed a connection");
            if (got < 0) return fail("read", strerror(errno));
            c->len += (size_t)got;
            for (;;) {  /* every complete answer in the buffer */
                char *blank = memmem(c->buf, c->len, "\r\n\r\n", 4);
                if (blank == NULL) {
                    if (c->len == BUF) return fail("response", "head larger than 64 KiB");
                    break;
                }
                size_t head = (size_t)(blank + 4 - c->buf);
                int status = c->len > 12 && strncmp(c->buf, "HTTP/1.", 7) == 0 ? atoi(c->buf + 9) : 0;
                long body = 0;
                if (c->state == READY) {
                    body = content_length(c->buf, head);
                    if (body < 0 || head + (size_t)body > BUF)
                        return fail("response", "not framed by a Content-Length under 64 KiB");
                }
                if (c->len < head + (size_t)body) break;
                c->len -= head + (size_t)body;
                memmove(c->buf, c->buf + head + (size_t)body, c->len);
                if (c->state == OPENING) {
                    if (status < 200 || status > 299) {
                        char detail[64];
                        snprintf(detail, sizeof detail, "CONNECT answered %d", status);
                        return fail("tunnel", detail);
                    }
                    c->state = READY;
                    if (++ready < n) continue;  /* the clock starts when every tunnel is open */
                    start = now();
                    end = start + seconds;
                    if (first_requests(conns, n, start, request, request_len) != 0) return 1;
                    continue;
                }
                if (status >= 200 && status <= 299) ok++;
                else bad_status++;
                double done = now();
                long bucket = (long)((done - c->sent) * 1e6) / BUCKET_US;
                hist[bucket < BUCKETS ? bucket : BUCKETS - 1]++;
                c->sent = done;
                if (write(c->fd, request, (size_t)request_len) != request_len)
                    return fail("write", strerror(errno));
            }
        }
    }
    double elapsed = now() - start;
    long answered = ok + bad_status;
    printf("BENCH-TUNLOAD ok=%ld status=%ld seconds=%.6f p50_ms=%.3f p99_ms=%.3f\n", ok,
           bad_status, elapsed, percentile(hist, answered, 0.50), percentile(hist, answered, 0.99));
    return 0;
}
