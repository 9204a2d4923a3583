/* tlsclient.c - a minimal HTTPS client for the tests, in two builds:
 *
 *   cc tlsclient.c -o tls-openssl-static -Wl,-Bstatic -lssl -lcrypto -Wl,-Bdynamic
 *       OpenSSL linked into the executable (no libssl.so mapped);
 *   cc -DUSE_NSS tlsclient.c $(pkg-config --cflags --libs nss) -o tls-nss
 *       NSS (libssl3) over NSPR: the I/O goes through PR_Write/PR_Read.
 *
 * usage: tlsclient PORT METHOD PATH [METHOD PATH ...]
 * Sends the requests one after the other on one keep-alive connection to
 * 127.0.0.1:PORT (a PUT carries the body "hello nss"/"hello static"), reads
 * each response whole, prints "STATUS BODYBYTES" per request. The NSS build
 * first writes and reads back a file holding an HTTP request through NSPR:
 * file I/O that must not look like a request to a tracer.
 * With TLSCLIENT_WAIT set, it waits for a line on stdin before connecting.
 * With TLSCLIENT_KTLS set (OpenSSL builds), it asks for kernel TLS, exits 5
 * if it did not get it, and sends PUT bodies with SSL_sendfile.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef USE_NSS
#include <nss.h>
#include <prio.h>
#include <prnetdb.h>
#include <ssl.h>

static PRFileDesc *conn;

static SECStatus accept_any_certificate(void *arg, PRFileDesc *fd,
                                        PRBool check_sig, PRBool is_server)
{
    return SECSuccess;      /* the tests' server is self-signed */
}

static void tls_connect(int port)
{
    PRNetAddr addr;
    if (NSS_NoDB_Init(NULL) != SECSuccess || NSS_SetDomesticPolicy() != SECSuccess)
        exit(10);
    PRFileDesc *tcp = PR_NewTCPSocket();
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

static int tls_write(const char *buf, int len) { return PR_Write(conn, buf, len); }
static int tls_read(char *buf, int len) { return PR_Read(conn, buf, len); }
static void tls_close(void) { PR_Close(conn); NSS_Shutdown(); }
static const char *body = "hello nss";

static void file_io_through_nspr(void)
{
    static const char fake[] = "GET /phantom-from-a-file HTTP/1.1\r\nHost: x\r\n\r\n";
    char back[sizeof(fake)];
    PRFileDesc *f = PR_Open("/tmp/tlsclient-nspr-file", PR_RDWR | PR_CREATE_FILE |
                            PR_TRUNCATE, 0600);
    if (!f)
        exit(14);
    PR_Write(f, fake, sizeof(fake) - 1);
    PR_Seek(f, 0, PR_SEEK_SET);
    PR_Read(f, back, sizeof(back));
    PR_Close(f);
    PR_Delete("/tmp/tlsclient-nspr-file");
}
#else
#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <sys/socket.h>
#include <unistd.h>

static SSL *conn;

static void tls_connect(int port)
{
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (!ctx || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0)
        exit(12);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    if (getenv("TLSCLIENT_KTLS"))
        SSL_CTX_set_options(ctx, SSL_OP_ENABLE_KTLS);
    conn = SSL_new(ctx);
    SSL_set_fd(conn, fd);
    if (SSL_connect(conn) != 1)
        exit(13);
    if (getenv("TLSCLIENT_KTLS") && !BIO_get_ktls_send(SSL_get_wbio(conn)))
        exit(5);        /* asked for kernel TLS and did not get it */
}

/* With kernel TLS, a PUT body goes through SSL_sendfile: the bytes never
 * pass SSL_write. */
static int send_body(const char *body)
{
    char path[] = "/tmp/tlsclient-body-XXXXXX";
    int fd = mkstemp(path), len = strlen(body);
    if (fd < 0 || write(fd, body, len) != len)
        return -1;
    unlink(path);
    ossl_ssize_t sent = SSL_sendfile(conn, fd, 0, len, 0);
    close(fd);
    return sent == len ? 0 : -1;
}

static int tls_write(const char *buf, int len) { return SSL_write(conn, buf, len); }
static int tls_read(char *buf, int len) { return SSL_read(conn, buf, len); }
static void tls_close(void) { SSL_shutdown(conn); SSL_free(conn); }
static const char *body = "hello static";
static void file_io_through_nspr(void) {}
#define HAVE_SENDFILE 1
#endif

/* Read one response: the head, then Content-Length bytes of body. */
static int read_response(int *status, long *body_bytes)
{
    static char buf[65536];
    int have = 0, n;
    char *end = NULL;
    buf[0] = 0;
    while (!(end = strstr(buf, "\r\n\r\n"))) {
        if (have >= (int)sizeof(buf) - 1 || (n = tls_read(buf + have,
                                              sizeof(buf) - 1 - have)) <= 0)
            return -1;
        have += n;
        buf[have] = 0;
    }
    long length = 0;
    char *cl = strcasestr(buf, "\r\ncontent-length:");
    if (cl && cl < end)
        length = strtol(cl + 17, NULL, 10);
    *status = atoi(buf + 9);
    long got = have - (end + 4 - buf);
    while (got < length) {
        char sink[16384];
        if ((n = tls_read(sink, sizeof(sink))) <= 0)
            return -1;
        got += n;
    }
    *body_bytes = got;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 4 || argc % 2)
        return 2;
    if (getenv("TLSCLIENT_WAIT")) {
        char line[16];
        if (!fgets(line, sizeof(line), stdin))
            return 3;
    }
    file_io_through_nspr();
    tls_connect(atoi(argv[1]));
    for (int i = 2; i + 1 < argc; i += 2) {
        char req[1024];
        int put = strcmp(argv[i], "PUT") == 0, status;
        long got;
        int sendfile_body = 0;
#ifdef HAVE_SENDFILE
        sendfile_body = put && getenv("TLSCLIENT_KTLS") != NULL;
#endif
        int len = snprintf(req, sizeof(req), "%s %s HTTP/1.1\r\nHost: 127.0.0.1:%s\r\n"
                           "Content-Length: %zu\r\n\r\n%s", argv[i], argv[i + 1],
                           argv[1], put ? strlen(body) : 0,
                           put && !sendfile_body ? body : "");
        if (tls_write(req, len) != len)
            return 4;
#ifdef HAVE_SENDFILE
        if (sendfile_body && send_body(body) != 0)
            return 6;
#endif
        if (read_response(&status, &got) != 0)
            return 4;
        printf("%d %ld\n", status, got);
    }
    tls_close();
    return 0;
}
