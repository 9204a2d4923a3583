/* ktlsserver.c - the HTTPS server of the VM kernel-TLS tests (tests/vm).
 *
 *   cc -O2 ktlsserver.c -o ktlsserver -lssl -lcrypto
 *   ktlsserver CERT KEY LOG
 *
 * Listens on 127.0.0.1 (a free port), prints "READY PORT" on stdout, and
 * serves each connection in a child process, with ordinary OpenSSL (no
 * kernel TLS here, so /proc/net/tls_stat counts only the client's). HTTP/1.1
 * keep-alive requests with a Content-Length body (or none):
 *   PUT  -> 200, empty body (the request body is read, counted, dropped)
 *   GET  PATH with /get-N (e.g. /bkt/get-1048576) -> 200 with N bytes
 *   else -> 404
 * For each request it appends one JSON line to LOG, the exact bytes it saw:
 *   {"method":"PUT","path":"/bkt/k","head_bytes":H,"body_bytes":N,
 *    "status":200,"resp_body_bytes":M}
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

static char buf[(1 << 17) + 1];   /* + room for a NUL after a head */
static size_t have;             /* bytes in buf */

static void fail(const char *what)
{
    fprintf(stderr, "ktlsserver: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(2);
}

/* More bytes into buf; 0 at the end of the connection. */
static int fill(SSL *ssl)
{
    if (have == sizeof buf - 1)
        fail("request head too long");
    int n = SSL_read(ssl, buf + have, sizeof buf - 1 - have);
    if (n <= 0)
        return 0;
    have += n;
    return 1;
}

static void consume(size_t n)
{
    memmove(buf, buf + n, have - n);
    have -= n;
}

static void write_all(SSL *ssl, const char *p, size_t len)
{
    while (len) {
        int n = SSL_write(ssl, p, len > 1 << 20 ? 1 << 20 : (int)len);
        if (n <= 0)
            fail("SSL_write");
        p += n;
        len -= n;
    }
}

static void serve(SSL *ssl, int log)
{
    static char zeros[1 << 16];
    for (;;) {
        char *end;
        while (!(end = memmem(buf, have, "\r\n\r\n", 4)))
            if (!fill(ssl))
                return;
        size_t head_len = end + 4 - buf;
        char saved = buf[head_len];
        buf[head_len] = 0;
        char method[16] = "", path[1024] = "";
        sscanf(buf, "%15s %1023s", method, path);
        long clen = 0;
        char *cl = strcasestr(buf, "\r\nContent-Length:");
        if (cl && cl < end)
            clen = atol(cl + 17);
        buf[head_len] = saved;
        consume(head_len);
        long body = 0;
        while (body < clen) {
            if (have == 0 && !fill(ssl))
                break;
            size_t take = (long)have < clen - body ? have : (size_t)(clen - body);
            body += take;
            consume(take);
        }
        int status = 200;
        long resp = 0;
        char *get = strstr(path, "/get-");
        if (!strcmp(method, "GET") && get)
            resp = atol(get + 5);
        else if (strcmp(method, "PUT"))
            status = 404;
        char head[512];
        int hn = snprintf(head, sizeof head, "HTTP/1.1 %d %s\r\nServer: ktlsserver\r\n"
                          "x-amz-request-id: KTLS%d\r\nETag: \"0123\"\r\n"
                          "Content-Length: %ld\r\n\r\n", status,
                          status == 200 ? "OK" : "Not Found", (int)getpid(), resp);
        char line[1400];
        int ln = snprintf(line, sizeof line, "{\"method\":\"%s\",\"path\":\"%s\","
                          "\"head_bytes\":%zu,\"body_bytes\":%ld,\"status\":%d,"
                          "\"resp_body_bytes\":%ld}\n", method, path, head_len, body,
                          status, resp);
        if (write(log, line, ln) != ln)
            fail("log write");
        if (body < clen)
            return;     /* the client went away mid-body: logged as such */
        write_all(ssl, head, hn);
        for (long left = resp; left > 0;) {
            size_t n = left < (long)sizeof zeros ? (size_t)left : sizeof zeros;
            write_all(ssl, zeros, n);
            left -= n;
        }
    }
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s CERT KEY LOG\n", argv[0]);
        return 2;
    }
    int log = open(argv[3], O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (log < 0)
        fail("open log");
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx || SSL_CTX_use_certificate_chain_file(ctx, argv[1]) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, argv[2], SSL_FILETYPE_PEM) != 1)
        fail("certificate or key");
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 16) ||
        getsockname(ls, (struct sockaddr *)&a, &al))
        fail("listen");
    signal(SIGCHLD, SIG_IGN);
    printf("READY %d\n", ntohs(a.sin_port));
    fflush(stdout);
    for (;;) {
        int s = accept(ls, NULL, NULL);
        if (s < 0)
            continue;
        if (fork() == 0) {
            close(ls);
            SSL *ssl = SSL_new(ctx);
            SSL_set_fd(ssl, s);
            if (SSL_accept(ssl) == 1)
                serve(ssl, log);
            SSL_shutdown(ssl);
            _exit(0);
        }
        close(s);
    }
}
