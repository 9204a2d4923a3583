/* ktlsclient.c - HTTPS requests over kernel TLS (OpenSSL 3, SSL_OP_ENABLE_KTLS)
 * for the VM tests (tests/vm): the request head goes through SSL_write, the
 * PUT body past OpenSSL's write path, straight to the kTLS socket.
 *
 *   cc -O2 ktlsclient.c -o ktlsclient -lssl -lcrypto -luring
 *   ktlsclient PORT tls1.2|tls1.3 REQUEST [REQUEST ...]
 *
 * REQUEST is one of
 *   PUT:MODE:PATH:FILE   a PUT of FILE's bytes, the body sent by MODE:
 *       sslsendfile  SSL_sendfile() (OpenSSL calls sendfile(2) itself)
 *       sendfile     sendfile(2) on the socket's fd, by this program
 *       splice       io_uring IORING_OP_SPLICE, file -> pipe -> socket
 *       syswrite     write(2) on the socket's fd, by this program
 *       uringsend    io_uring IORING_OP_SEND from this program's buffer
 *       write        SSL_write (kTLS still sends it; for comparison)
 *     (a 0-byte body calls none of them)
 *   GET:PATH             a GET, the response read with SSL_read (with kTLS
 *                        receive, a recvmsg(2) under OpenSSL)
 * All requests go one after the other on one keep-alive connection to
 * 127.0.0.1:PORT. Each is timed on CLOCK_MONOTONIC from just before its
 * first byte is written to just after its response's last byte is read.
 *
 * Output: one JSON object on stdout:
 *   {"pid":..,"version":"TLSv1.3","cipher":"..","ktls_send":1,"ktls_recv":0,
 *    "requests":[{"method":"PUT","mode":"sendfile","path":"/b/k",
 *                 "req_bytes":N,"status":200,"resp_bytes":M,
 *                 "latency_ms":x.xxxxxx,"head_write_ms":..,"last_read_ms":..},
 *                ...]}
 * head_write_ms is how long the head's SSL_write took, last_read_ms how long
 * the response's last SSL_read call took (both inside latency_ms).
 * Exit status: 0 if every request got a whole response; 5 if kernel TLS did
 * not engage where a request needs it (sendfile/splice body: kTLS send;
 * GET over TLS 1.2: kTLS receive); 2 on any other error.
 * The program knows nothing of any tracer.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static void die(int code, const char *what)
{
    fprintf(stderr, "ktlsclient: %s%s%s\n", what, errno ? ": " : "",
            errno ? strerror(errno) : "");
    ERR_print_errors_fp(stderr);
    exit(code);
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void ssl_write_all(SSL *ssl, const char *buf, size_t len)
{
    while (len) {
        int n = SSL_write(ssl, buf, len > 1 << 20 ? 1 << 20 : (int)len);
        if (n <= 0)
            die(2, "SSL_write");
        buf += n;
        len -= n;
    }
}

/* --- the PUT body's ways out ---------------------------------------------- */

static long body_sslsendfile(SSL *ssl, int file, long size)
{
    long sent = 0;
    while (sent < size) {
        ossl_ssize_t n = SSL_sendfile(ssl, file, sent, size - sent, 0);
        if (n <= 0)
            die(2, "SSL_sendfile");
        sent += n;
    }
    return sent;
}

static long body_sendfile(int sock, int file, long size)
{
    off_t off = 0;
    while (off < size) {
        ssize_t n = sendfile(sock, file, &off, size - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die(2, "sendfile");
    }
    return off;
}

static int uring_splice(struct io_uring *ring, int in, int64_t in_off, int out,
                        unsigned len)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    struct io_uring_cqe *cqe;
    if (!sqe)
        die(2, "io_uring_get_sqe");
    io_uring_prep_splice(sqe, in, in_off, out, -1, len, 0);
    if (io_uring_submit(ring) != 1)
        die(2, "io_uring_submit");
    int r = io_uring_wait_cqe(ring, &cqe);
    if (r < 0) {
        errno = -r;
        die(2, "io_uring_wait_cqe");
    }
    r = cqe->res;
    io_uring_cqe_seen(ring, cqe);
    if (r <= 0) {
        errno = r < 0 ? -r : 0;
        die(2, "IORING_OP_SPLICE");
    }
    return r;
}

static void ring_open(struct io_uring *ring)
{
    int r = io_uring_queue_init(4, ring, 0);
    if (r < 0) {
        errno = -r;
        die(2, "io_uring_queue_init");
    }
}

/* file -> pipe -> socket, each step an IORING_OP_SPLICE (splice(2) needs a
 * pipe on one side). */
static long body_splice(int sock, int file, long size)
{
    struct io_uring ring;
    int p[2];
    long sent = 0;
    ring_open(&ring);
    if (pipe(p))
        die(2, "pipe");
    int cap = fcntl(p[1], F_SETPIPE_SZ, 1 << 20);
    if (cap <= 0)
        cap = 65536;
    while (sent < size) {
        long want = size - sent < cap ? size - sent : cap;
        int in_pipe = uring_splice(&ring, file, sent, p[1], want);
        while (in_pipe > 0) {
            int n = uring_splice(&ring, p[0], -1, sock, in_pipe);
            in_pipe -= n;
            sent += n;
        }
    }
    close(p[0]);
    close(p[1]);
    io_uring_queue_exit(&ring);
    return sent;
}

/* The body in 64 KiB pieces, each sent by send_piece (on the socket, or
 * through the SSL object in arg). */
static long body_pieces(int sock, int file, long size,
                        long (*send_piece)(int, const char *, long, void *),
                        void *arg)
{
    static char buf[1 << 16];
    long sent = 0;
    while (sent < size) {
        ssize_t n = pread(file, buf, sizeof buf, sent);
        if (n <= 0)
            die(2, "read body file");
        for (long off = 0; off < n;)
            off += send_piece(sock, buf + off, n - off, arg);
        sent += n;
    }
    return sent;
}

static long piece_write(int sock, const char *buf, long len, void *arg)
{
    (void)arg;
    ssize_t n = write(sock, buf, len);
    if (n <= 0)
        die(2, "write");
    return n;
}

static long piece_uring_send(int sock, const char *buf, long len, void *arg)
{
    struct io_uring *ring = arg;
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    struct io_uring_cqe *cqe;
    io_uring_prep_send(sqe, sock, buf, len, 0);
    io_uring_submit(ring);
    if (io_uring_wait_cqe(ring, &cqe) < 0 || cqe->res <= 0)
        die(2, "io_uring send");
    int n = cqe->res;
    io_uring_cqe_seen(ring, cqe);
    return n;
}

static long body_uring_send(int sock, int file, long size)
{
    struct io_uring ring;
    ring_open(&ring);
    long sent = body_pieces(sock, file, size, piece_uring_send, &ring);
    io_uring_queue_exit(&ring);
    return sent;
}

static long piece_ssl_write(int sock, const char *buf, long len, void *arg)
{
    (void)sock;
    ssl_write_all(arg, buf, len);
    return len;
}

/* --- the response ------------------------------------------------------- */

/* Reads one response whole: its status, and its body's byte count; the
 * time its last SSL_read call began. */
static void read_response(SSL *ssl, int *status, long *body, double *last_read)
{
    static char buf[1 << 16];
    char head[8192];
    size_t hl = 0;
    long clen = -1, got = 0;
    for (;;) {
        *last_read = now_ms();
        int n = SSL_read(ssl, buf, sizeof buf);
        if (n <= 0)
            die(2, "SSL_read: connection closed before the response ended");
        if (clen < 0) {
            size_t k = n < (int)(sizeof head - 1 - hl) ? (size_t)n : sizeof head - 1 - hl;
            memcpy(head + hl, buf, k);
            hl += k;
            head[hl] = 0;
            char *end = strstr(head, "\r\n\r\n");
            if (!end) {
                if (hl == sizeof head - 1)
                    die(2, "response head too long");
                continue;
            }
            size_t headlen = end + 4 - head;
            *status = atoi(head + 9);
            char *cl = strcasestr(head, "\r\nContent-Length:");
            if (!cl || cl > end)
                die(2, "response without Content-Length");
            clen = atol(cl + 17);
            /* the part of this read after the head (hl was hl_before + k) */
            got = (long)(hl - headlen) + (n - (long)k);
        } else {
            got += n;
        }
        if (got >= clen)
            break;
    }
    if (got != clen)
        die(2, "response body longer than its Content-Length");
    *body = got;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s PORT tls1.2|tls1.3 PUT:MODE:PATH:FILE|GET:PATH ...\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]);
    int ver = strcmp(argv[2], "tls1.2") == 0 ? TLS1_2_VERSION : TLS1_3_VERSION;

    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx)
        die(2, "SSL_CTX_new");
    SSL_CTX_set_options(ctx, SSL_OP_ENABLE_KTLS);
    SSL_CTX_set_min_proto_version(ctx, ver);
    SSL_CTX_set_max_proto_version(ctx, ver);
    /* ciphers the kernel can take over (AES-GCM) */
    SSL_CTX_set_cipher_list(ctx, "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256");
    SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256");

    int sock = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (connect(sock, (struct sockaddr *)&a, sizeof a))
        die(2, "connect");
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, sock);
    if (SSL_connect(ssl) != 1)
        die(2, "SSL_connect");
    int ktls_send = BIO_get_ktls_send(SSL_get_wbio(ssl)) ? 1 : 0;
    int ktls_recv = BIO_get_ktls_recv(SSL_get_rbio(ssl)) ? 1 : 0;

    printf("{\"pid\":%d,\"version\":\"%s\",\"cipher\":\"%s\",\"ktls_send\":%d,"
           "\"ktls_recv\":%d,\"requests\":[", (int)getpid(), SSL_get_version(ssl),
           SSL_get_cipher(ssl), ktls_send, ktls_recv);
    for (int i = 3; i < argc; i++) {
        char *spec = strdup(argv[i]);
        char *method = strtok(spec, ":");
        char *mode = "", *path, *file = NULL;
        int body_fd = -1;
        long size = 0, sent = 0;
        if (strcmp(method, "PUT") == 0) {
            mode = strtok(NULL, ":");
            path = strtok(NULL, ":");
            file = strtok(NULL, "");
            struct stat st;
            if (!mode || !path || !file)
                die(2, "PUT:MODE:PATH:FILE");
            if ((body_fd = open(file, O_RDONLY)) < 0 || fstat(body_fd, &st))
                die(2, file);
            size = st.st_size;
            if (strcmp(mode, "write") && strcmp(mode, "sslsendfile") &&
                strcmp(mode, "sendfile") && strcmp(mode, "splice") &&
                strcmp(mode, "syswrite") && strcmp(mode, "uringsend"))
                die(2, "unknown body mode");
            if (!ktls_send && strcmp(mode, "write")) {
                fprintf(stderr, "ktlsclient: no kernel TLS send on this connection "
                        "(%s %s): cannot send a body by %s\n", SSL_get_version(ssl),
                        SSL_get_cipher(ssl), mode);
                return 5;
            }
        } else if (strcmp(method, "GET") == 0) {
            path = strtok(NULL, "");
            if (!path)
                die(2, "GET:PATH");
            if (ver == TLS1_2_VERSION && !ktls_recv) {
                fprintf(stderr, "ktlsclient: no kernel TLS receive on this TLS 1.2 "
                        "connection (%s)\n", SSL_get_cipher(ssl));
                return 5;
            }
        } else {
            die(2, "REQUEST is PUT:MODE:PATH:FILE or GET:PATH");
        }
        char head[1024];
        int hn = body_fd >= 0
            ? snprintf(head, sizeof head, "PUT %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                       "User-Agent: ktlsclient\r\nContent-Type: application/octet-stream\r\n"
                       "Content-Length: %ld\r\n\r\n", path, port, size)
            : snprintf(head, sizeof head, "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                       "User-Agent: ktlsclient\r\n\r\n", path, port);

        double t0 = now_ms();
        ssl_write_all(ssl, head, hn);
        double t_head = now_ms();
        if (size > 0) {
            if (!strcmp(mode, "sslsendfile"))
                sent = body_sslsendfile(ssl, body_fd, size);
            else if (!strcmp(mode, "sendfile"))
                sent = body_sendfile(sock, body_fd, size);
            else if (!strcmp(mode, "splice"))
                sent = body_splice(sock, body_fd, size);
            else if (!strcmp(mode, "syswrite"))
                sent = body_pieces(sock, body_fd, size, piece_write, NULL);
            else if (!strcmp(mode, "uringsend"))
                sent = body_uring_send(sock, body_fd, size);
            else
                sent = body_pieces(sock, body_fd, size, piece_ssl_write, ssl);
        }
        int status = 0;
        long resp = 0;
        double t_last;
        read_response(ssl, &status, &resp, &t_last);
        double t1 = now_ms();

        printf("%s{\"method\":\"%s\",\"mode\":\"%s\",\"path\":\"%s\",\"req_bytes\":%ld,"
               "\"status\":%d,\"resp_bytes\":%ld,\"latency_ms\":%.6f,"
               "\"head_write_ms\":%.6f,\"last_read_ms\":%.6f}",
               i > 3 ? "," : "", method, mode, path, sent, status, resp, t1 - t0,
               t_head - t0, t1 - t_last);
        if (body_fd >= 0)
            close(body_fd);
        free(spec);
    }
    printf("]}\n");
    fflush(stdout);
    SSL_shutdown(ssl);
    SSL_free(ssl);
    close(sock);
    SSL_CTX_free(ctx);
    return 0;
}
