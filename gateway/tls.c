#include "tls.h"

#include <stdio.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

/* The whole certificate check, wrapped: it runs OpenSSL's (chain, dates, host name) and keeps
 * the verdict when it fails. */
static int verify_chain(X509_STORE_CTX *x, void *arg)
{
    smp_tls_diag_t *d = arg;
    int ok = X509_verify_cert(x);
    if (ok <= 0) {
        int err = X509_STORE_CTX_get_error(x);
        if (err == X509_V_ERR_HOSTNAME_MISMATCH || err == X509_V_ERR_IP_ADDRESS_MISMATCH) {
            snprintf(d->refusal, sizeof d->refusal,
                     "the broker's certificate is not valid for host name \"%.80s\"", d->host);
        } else {
            snprintf(d->refusal, sizeof d->refusal, "the broker's certificate was refused: %.100s",
                     X509_verify_cert_error_string(err));
        }
    }
    return ok;
}

/* A TLS alert, sent or received, says why the other side or we ended the handshake. The
 * certificate check's own verdict, when there is one, is more precise: keep it. */
static void on_info(const SSL *ssl, int where, int ret)
{
    if ((where & SSL_CB_ALERT) == 0 || (ret >> 8) != SSL3_AL_FATAL) {
        return;
    }
    smp_tls_diag_t *d = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
    if (d == NULL || d->refusal[0] != '\0') {
        return;
    }
    const char *desc = SSL_alert_desc_string_long(ret);
    if ((ret & 0xff) == 116) {
        desc = "certificate required"; /* TLS 1.3's; OpenSSL 3.0 names it "unknown" */
    }
    snprintf(d->refusal, sizeof d->refusal, "TLS alert %s: %.100s",
             (where & SSL_CB_READ) ? "from the broker" : "to the broker", desc);
}

/* The first OpenSSL error, for a log line (the queue is cleared). */
static void ssl_error(smp_tls_diag_t *d, const char *what, const char *path)
{
    unsigned long e = ERR_get_error();
    char buf[120];
    ERR_error_string_n(e, buf, sizeof buf);
    ERR_clear_error();
    /* The result is looked at so that a truncated message is a choice, not a warning. */
    int n = snprintf(d->refusal, sizeof d->refusal, "%s %s: %s", what, path, e != 0 ? buf : "");
    (void)n;
}

/* The context: everything libmosquitto would set, plus the minimum version and the
 * diagnostics. Returns NULL (with diag->refusal) when a file cannot be used. */
static SSL_CTX *make_ctx(const smp_config_t *cfg, const char *host, smp_tls_diag_t *diag)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == NULL) {
        ssl_error(diag, "cannot create a TLS context", "");
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_app_data(ctx, diag);
    SSL_CTX_set_info_callback(ctx, on_info);
    const char *ca = cfg->mqtt.tls_ca_file;
    /* Without a CA file, trust the system's store (Debian keeps it in /etc/ssl/certs). */
    if (SSL_CTX_load_verify_locations(ctx, ca, ca == NULL ? "/etc/ssl/certs" : NULL) != 1) {
        ssl_error(diag, "cannot load the CA file", ca != NULL ? ca : "/etc/ssl/certs");
        goto fail;
    }
    const char *crt = cfg->mqtt.tls_cert_file, *key = cfg->mqtt.tls_key_file;
    if (crt != NULL && SSL_CTX_use_certificate_chain_file(ctx, crt) != 1) {
        ssl_error(diag, "cannot load the client certificate", crt);
        goto fail;
    }
    if (key != NULL && (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
                        SSL_CTX_check_private_key(ctx) != 1)) {
        ssl_error(diag, "cannot use the client key", key);
        goto fail;
    }
    if (cfg->mqtt.tls_no_verify) {
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
        return ctx;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    /* The broker's certificate must name the host we connect to: DNS name or IP address. */
    X509_VERIFY_PARAM *param = SSL_CTX_get0_param(ctx);
    X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    if (X509_VERIFY_PARAM_set1_ip_asc(param, host) != 1) {
        ERR_clear_error();
        X509_VERIFY_PARAM_set1_host(param, host, 0);
    }
    SSL_CTX_set_cert_verify_callback(ctx, verify_chain, diag);
    return ctx;
fail:
    SSL_CTX_free(ctx);
    return NULL;
}

int smp__tls_configure(struct mosquitto *m, const smp_config_t *cfg, const char *host,
                       smp_tls_diag_t *diag)
{
    memset(diag, 0, sizeof *diag);
    snprintf(diag->host, sizeof diag->host, "%s", host);
    SSL_CTX *ctx = make_ctx(cfg, host, diag);
    if (ctx == NULL) {
        return MOSQ_ERR_TLS;
    }
    /* libmosquitto takes its own reference, and must use the context as it is: its defaults
     * (on unless turned off) need its own TLS setup, which it skips for a context of ours. */
    int rc = mosquitto_int_option(m, MOSQ_OPT_SSL_CTX_WITH_DEFAULTS, 0);
    if (rc == MOSQ_ERR_SUCCESS) {
        rc = mosquitto_void_option(m, MOSQ_OPT_SSL_CTX, ctx);
    }
    SSL_CTX_free(ctx);
    return rc;
}
