/* mxclient.c - the C client of tests/test_matrix.py: a plan of requests on
 * keep-alive connections, each request timed on CLOCK_MONOTONIC.
 *
 *   cc -O1 mxclient.c -o mx-static -Wl,-Bstatic -lssl -lcrypto -Wl,-Bdynamic
 *       OpenSSL linked into the executable (SSL_write/SSL_read);
 *   cc -O1 -DUSE_NSS mxclient.c $(pkg-config --cflags --libs nss) -o mx-nss
 *       NSS over NSPR (PR_Write/PR_Read);
 *   cc -O1 -DUSE_PLAIN mxclient.c -o mx-plain
 *       plain HTTP with write(2)/read(2).
 *
 * usage: mxclient PORT PLANFILE
 * PLANFILE lines:
 *   C                         a new connection to 127.0.0.1:PORT
 *   R CASE METHOD TARGET BODYLEN TE EXPECT RMAX WMAX HB
 *       TE: cl (Content-Length), ch (chunked, one chunk per write of WMAX
 *       bytes at most) or no (no body, no framing headers); EXPECT 1 sends
 *       `Expect: 100-continue` and waits for the 100 before the body; RMAX:
 *       bytes asked per read call; WMAX: bytes per body write; HB 1: the
 *       head and the body (Content-Length) in one write.
 * The response is read by its framing (1xx skipped, HEAD/204/304 bodiless,
 * Content-Length, chunked with extensions and trailers, or until EOF).
 * Prints one JSON object per request: case, status, interim (1xx seen),
 * start (just before the first write), first (first response byte read),
 * end (just after the read call that returned the last response byte: a
 * close-delimited body's final EOF read is not counted), resp_wire (bytes
 * after the final head, chunk framing included), resp_payload (body bytes),
 * preempted (an involuntary context switch between the start's clock
 * reading and the first write's return, or during the read that set end:
 * the interval may be stretched; the test runs its clients at real-time
 * priority, where only the kernel's real-time throttling preempts them).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <sys/resource.h>

/* Involuntary context switches of this thread: the clock readings below
 * are trusted only when none happened between a reading and the I/O call
 * it times (a preemption there stretches the client's interval). */
static long nivcsw(void)
{
    struct rusage ru;
    getrusage(RUSAGE_THREAD, &ru);
    return ru.ru_nivcsw;
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#if defined(USE_NSS)
#include <nss.h>
#include <prio.h>
#include <prnetdb.h>
#include <ssl.h>

static PRFileDesc *conn;

static SECStatus accept_any_certificate(void *arg, PRFileDesc *fd,
                                        PRBool check_sig, PRBool is_server)
{
    return SECSuccess;
}

static void net_init(void)
{
    if (NSS_NoDB_Init(NULL) != SECSuccess || NSS_SetDomesticPolicy() != SECSuccess)
        exit(10);
}

static void net_connect(int port)
{
    PRNetAddr addr;
    PRFileDesc *tcp = PR_NewTCPSocket();
    PRSocketOptionData opt = {.option = PR_SockOpt_NoDelay, .value.no_delay = PR_TRUE};
    PR_SetSocketOption(tcp, &opt);
    conn = SSL_ImportFD(NULL, tcp);
    if (!conn)
        exit(11);
    SSL_OptionSet(conn, SSL_SECURITY, PR_TRUE);
    SSL_OptionSet(conn, SSL_HANDSHAKE_AS_CLIENT, PR_TRUE);
    SSL_AuthCertificateHook(conn, accept_any_certificate, NULL);
    SSL_SetURL(conn, "localhost");
    PR_InitializeNetAddr(PR_IpAddrLoopback, (PRUint16)port, &addr);
    if (PR_Connect(conn, &addr, PR_INTERVAL_NO_TIMEOUT) != PR_SUCCESS)
        exit(12);
    if (SSL_ResetHandshake(conn, PR_FALSE) != SECSuccess ||
        SSL_ForceHandshake(conn) != SECSuccess)
        exit(13);
}

static int net_write(const char *buf, int len) { return PR_Write(conn, buf, len); }
static int net_read(char *buf, int len) { return PR_Read(conn, buf, len); }
static void net_close(void) { PR_Close(conn); }
static void net_done(void) { NSS_Shutdown(); }
#else
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

static int tcp_connect(int port)
{
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0)
        exit(12);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;
}

#if defined(USE_PLAIN)
static int fd = -1;
static void net_init(void) {}
static void net_connect(int port) { fd = tcp_connect(port); }
static int net_write(const char *buf, int len) { return write(fd, buf, len); }
static int net_read(char *buf, int len) { return read(fd, buf, len); }
static void net_close(void) { close(fd); }
static void net_done(void) {}
#else
#include <openssl/ssl.h>

static SSL_CTX *ctx;
static SSL *conn;

static void net_init(void)
{
    ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx)
        exit(10);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
}

static void net_connect(int port)
{
    conn = SSL_new(ctx);
    SSL_set_fd(conn, tcp_connect(port));
    if (SSL_connect(conn) != 1)
        exit(13);
}

static int net_write(const char *buf, int len) { return SSL_write(conn, buf, len); }
static int net_read(char *buf, int len) { return SSL_read(conn, buf, len); }
static void net_close(void)
{
    int fd = SSL_get_fd(conn);
    SSL_shutdown(conn);
    SSL_free(conn);
    close(fd);
}
static void net_done(void) { SSL_CTX_free(ctx); }
#endif
#endif

/* ---- buffered reading, every byte counted ---------------------------- */

static char rbuf[1 << 17];
static int rpos, rlen, rmax;
static long long first_ns, last_ns;
static int last_preempted;      /* during the read that set last_ns */

/* More bytes into the buffer: 1, or 0 at EOF (or an error). */
static int fill(void)
{
    if (rpos == rlen)
        rpos = rlen = 0;
    if (rpos > 0 && (int)sizeof(rbuf) - rlen < rmax) {
        memmove(rbuf, rbuf + rpos, rlen - rpos);
        rlen -= rpos;
        rpos = 0;
    }
    int room = sizeof(rbuf) - rlen;
    long before = nivcsw();
    int n = net_read(rbuf + rlen, room < rmax ? room : rmax);
    if (n <= 0)
        return 0;
    last_ns = now_ns();
    last_preempted = nivcsw() != before;
    if (!first_ns)
        first_ns = last_ns;
    rlen += n;
    return 1;
}

/* The next line (through "\n") into line; its length, or -1 at EOF. */
static int read_line(char *line, int size)
{
    for (;;) {
        char *nl = memchr(rbuf + rpos, '\n', rlen - rpos);
        if (nl) {
            int len = nl + 1 - (rbuf + rpos);
            if (len >= size)
                exit(20);
            memcpy(line, rbuf + rpos, len);
            line[len] = 0;
            rpos += len;
            return len;
        }
        if (!fill())
            return -1;
    }
}

/* Discard n bytes; 0, or -1 at EOF. */
static int skip(long n)
{
    while (n > 0) {
        if (rpos == rlen && !fill())
            return -1;
        long have = rlen - rpos;
        long take = have < n ? have : n;
        rpos += take;
        n -= take;
    }
    return 0;
}

struct head {
    int status;
    long length;        /* -1: none */
    int chunked, close;
};

/* One response head; -1 at EOF. */
static int read_head(struct head *h)
{
    char line[65536];
    int len;
    memset(h, 0, sizeof(*h));
    h->length = -1;
    if ((len = read_line(line, sizeof(line))) < 12)
        return -1;
    h->status = atoi(line + 9);
    while ((len = read_line(line, sizeof(line))) > 2) {
        if (!strncasecmp(line, "content-length:", 15))
            h->length = strtol(line + 15, NULL, 10);
        else if (!strncasecmp(line, "transfer-encoding:", 18) &&
                 strcasestr(line, "chunked"))
            h->chunked = 1;
        else if (!strncasecmp(line, "connection:", 11) && strcasestr(line, "close"))
            h->close = 1;
    }
    return len < 0 ? -1 : 0;
}

/* The body of a response by its framing: wire bytes, or -1. */
static long read_body(const char *method, struct head *h, long *payload)
{
    *payload = 0;
    if (!strcmp(method, "HEAD") || h->status == 204 || h->status == 304 ||
        h->status < 200)
        return 0;
    if (h->chunked) {
        char line[65536];
        long wire = 0;
        for (;;) {
            int len = read_line(line, sizeof(line));
            if (len < 0)
                return -1;
            wire += len;
            long size = strtol(line, NULL, 16);
            if (size == 0) {
                while ((len = read_line(line, sizeof(line))) > 2)
                    wire += len;
                return len < 0 ? -1 : wire + len;
            }
            if (skip(size) < 0 || (len = read_line(line, sizeof(line))) != 2)
                return -1;
            wire += size + 2;
            *payload += size;
        }
    }
    if (h->length >= 0) {
        if (skip(h->length) < 0)
            return -1;
        *payload = h->length;
        return h->length;
    }
    long wire = rlen - rpos;         /* until the server closes */
    rpos = rlen;
    while (fill()) {
        wire += rlen - rpos;
        rpos = rlen;
    }
    *payload = wire;
    return wire;
}

static char body_data[65536];

static int write_all(const char *buf, long len)
{
    while (len > 0) {
        int n = net_write(buf, len);
        if (n <= 0)
            return -1;
        buf += n;
        len -= n;
    }
    return 0;
}

static int send_body(long len, int chunked, int wmax)
{
    char line[32];
    while (len > 0) {
        int n = len < wmax ? len : wmax;
        if (chunked) {
            /* one chunk a write: size line, data, CRLF */
            static char chunk[65536 + 32];
            int l = snprintf(chunk, sizeof(chunk), "%x\r\n", n);
            memcpy(chunk + l, body_data, n);
            memcpy(chunk + l + n, "\r\n", 2);
            if (write_all(chunk, l + n + 2) < 0)
                return -1;
        } else if (write_all(body_data, n) < 0) {
            return -1;
        }
        len -= n;
    }
    if (chunked) {
        snprintf(line, sizeof(line), "0\r\n\r\n");
        return write_all(line, 5);
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 3)
        return 2;
    int port = atoi(argv[1]), connected = 0;
    FILE *plan = fopen(argv[2], "r");
    if (!plan)
        return 2;
    memset(body_data, 'c', sizeof(body_data));
    net_init();
    char line[4096];
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof(line), plan)) {
        if (line[0] == 'C') {
            if (connected)
                net_close();
            net_connect(port);
            connected = 1;
            rpos = rlen = 0;
            continue;
        }
        char kase[256], method[16], target[2048], te[4];
        long bodylen;
        int expect, wmax, hb;
        if (line[0] != 'R' || sscanf(line + 2, "%255s %15s %2047s %ld %3s %d %d %d %d",
                                     kase, method, target, &bodylen, te, &expect,
                                     &rmax, &wmax, &hb) != 9)
            return 2;
        int chunked = !strcmp(te, "ch");
        static char req[1 << 17];
        int len = snprintf(req, 4096, "%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                           "User-Agent: mxclient\r\n", method, target, port);
        if (chunked)
            len += snprintf(req + len, 4096, "Transfer-Encoding: chunked\r\n");
        else if (!strcmp(te, "cl"))
            len += snprintf(req + len, 4096, "Content-Length: %ld\r\n", bodylen);
        if (expect)
            len += snprintf(req + len, 4096, "Expect: 100-continue\r\n");
        len += snprintf(req + len, 4096, "\r\n");
        int together = hb && !expect && !chunked && bodylen <= 65536;
        if (together) {
            memcpy(req + len, body_data, bodylen);
            len += bodylen;
        }
        struct head h;
        int interim = 0;
        long payload, wire;
        first_ns = 0;
        long before = nivcsw();
        long long start = now_ns();
        if (write_all(req, len) < 0)
            return 4;
        int start_preempted = nivcsw() != before;
        if (expect) {
            if (read_head(&h) < 0)
                return 5;
            if (h.status == 100)
                interim = 1;
            else
                goto final;      /* a final answer: the body is not sent */
        }
        if (!together && (bodylen > 0 || chunked) && send_body(bodylen, chunked, wmax) < 0)
            return 4;
        for (;;) {
            if (read_head(&h) < 0)
                return 5;
            if (h.status >= 200)
                break;
            interim = 1;
        }
final:
        wire = read_body(method, &h, &payload);
        long long end = last_ns;
        if (wire < 0)
            return 6;
        printf("{\"case\":\"%s\",\"status\":%d,\"interim\":%s,\"start\":%lld,"
               "\"first\":%lld,\"end\":%lld,\"resp_wire\":%ld,\"resp_payload\":%ld,"
               "\"preempted\":%s}\n",
               kase, h.status, interim ? "true" : "false", start, first_ns, end,
               wire, payload, start_preempted || last_preempted ? "true" : "false");
        if (h.close) {
            net_close();
            connected = 0;
        }
    }
    if (connected)
        net_close();
    net_done();
    return 0;
}
