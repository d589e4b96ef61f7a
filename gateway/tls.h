/* tls: the MQTT bridge's TLS settings on a libmosquitto instance, and why a handshake failed.
 *
 * libmosquitto 2.0 offers "tlsv1.2" only as an exact version (it would shut TLS 1.3 out) and
 * reports a refused handshake as a bare protocol error. So the bridge hands libmosquitto a
 * complete OpenSSL context of its own (MOSQ_OPT_SSL_CTX): CA, client certificate and key, the
 * broker's host name to verify, TLS 1.2 as the minimum, and callbacks that keep the reason of a
 * failure — the certificate check's verdict ("certificate has expired", a host name mismatch)
 * or the TLS alert either side sent ("unknown CA", "protocol version") — for the log line. */
#ifndef SMP_TLS_H
#define SMP_TLS_H

#include <stddef.h>

#include <mosquitto.h>

#include "config.h"

typedef struct smp_tls_diag {
    char host[256];    /* the name the broker's certificate must carry */
    char refusal[160]; /* why the last handshake failed; "" when it did not */
} smp_tls_diag_t;

/* Configures TLS on a fresh instance from cfg->mqtt (CA file, client certificate and key,
 * verification per tls.verify) with TLS 1.2 as the minimum. `diag` is borrowed and must stay
 * valid while `m` exists; it is cleared here and filled by a failing handshake. Returns a
 * MOSQ_ERR_* code; MOSQ_ERR_TLS when a file cannot be used, with the reason in diag->refusal.
 * Loop thread. */
int smp__tls_configure(struct mosquitto *m, const smp_config_t *cfg, const char *host,
                       smp_tls_diag_t *diag);

#endif
