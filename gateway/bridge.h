/* Bridge: the MQTT client, driven by the libuv loop (no libmosquitto thread).
 *
 * The socket sits on a uv_poll for mosquitto_loop_read/loop_write; mosquitto_loop_misc runs on
 * a timer. The broker's host name is resolved with uv_getaddrinfo, off the loop. On connection
 * loss it reconnects with backoff (1 s doubling to 30 s, reset on success). The gateway status
 * topic P/G/status carries a retained {"state":"online",...} after every connect and the offline
 * message as the Will. QoS 1 publishes are bounded by mqtt.inflight_max: beyond that,
 * smp_bridge_publish answers -EAGAIN and the caller keeps the message (the store's outbox). */
#ifndef SMP_BRIDGE_H
#define SMP_BRIDGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "config.h"

typedef struct smp_bridge smp_bridge_t;

/* MQTT 5 request properties of an incoming message (NULL/0 when absent or on MQTT 3), and
 * whether the broker delivered it as a retained message (stored before this subscription). */
typedef struct smp_mqtt_props {
    const char *response_topic;
    const void *correlation_data;
    size_t correlation_len;
    bool retained;
} smp_mqtt_props_t;

typedef struct smp_bridge_cbs {
    /* Connected (and subscriptions re-sent). The engine publishes statuses and a full refresh. */
    void (*on_connect)(void *arg);
    /* Connection lost or closed. Unacknowledged publishes will not be acknowledged. */
    void (*on_disconnect)(void *arg);
    /* A message arrived on a subscribed topic. Everything is borrowed for the call. */
    void (*on_message)(void *arg, const char *topic, const void *payload, size_t len,
                       const smp_mqtt_props_t *props);
    /* The broker acknowledged the QoS 1 publish made with `token`. */
    void (*on_ack)(void *arg, uint64_t token);
    /* The bridge is fully stopped (after smp_bridge_stop). */
    void (*on_stopped)(void *arg);
} smp_bridge_cbs_t;

/* `cfg` is borrowed and must outlive the bridge. Returns 0 or a negative code. */
int smp_bridge_new(uv_loop_t *loop, const smp_config_t *cfg, const smp_bridge_cbs_t *cbs, void *arg,
                   smp_bridge_t **out);
/* Starts connecting (asynchronously). */
int smp_bridge_start(smp_bridge_t *b);
/* Adds a subscription, sent now if connected and again after every reconnect. With MQTT 5 it
 * asks the broker never to send retained messages (retain handling 2); on MQTT 3 the broker
 * sends them, flagged `retained` in on_message. */
int smp_bridge_subscribe(smp_bridge_t *b, const char *topic, int qos);
/* Publishes. For qos 1 with a non-zero token, on_ack(token) follows the PUBACK. Returns 0,
 * -ENOTCONN when not connected, -EAGAIN when the in-flight window is full, or another negative
 * code. Publishing with `props` (MQTT 5) sets Correlation Data on the message. */
int smp_bridge_publish(smp_bridge_t *b, const char *topic, const void *payload, size_t len, int qos,
                       bool retain, uint64_t token, const smp_mqtt_props_t *props);
/* The same for messages that must not wait behind data (command results, device status): they
 * may also use SMP_BRIDGE_RESERVED slots beyond mqtt.inflight_max, so a window full of data
 * never holds them back. -EAGAIN only when those are taken too. */
#define SMP_BRIDGE_RESERVED 32
int smp_bridge_publish_reserved(smp_bridge_t *b, const char *topic, const void *payload, size_t len,
                                int qos, bool retain, uint64_t token,
                                const smp_mqtt_props_t *props);
bool smp_bridge_connected(const smp_bridge_t *b);
size_t smp_bridge_inflight(const smp_bridge_t *b);
/* Publishes the retained offline status, waits (bounded by timeout_ms) for outstanding
 * acknowledgements, disconnects, closes its handles, then calls on_stopped. */
void smp_bridge_stop(smp_bridge_t *b, uint32_t timeout_ms);
/* A reload changed the MQTT settings (`cfg`, borrowed from now on): ends the connection
 * cleanly (DISCONNECT), then connects at once with the new settings; on_disconnect and
 * on_connect follow as for any reconnect. Not from inside a bridge callback. The status topic
 * and subscriptions stay. Returns 0, or a negative code (the old settings stay). */
int smp_bridge_reconfigure(smp_bridge_t *b, const smp_config_t *cfg);
/* The same settings in another config object (a reload that left MQTT as it was): only the
 * borrowed pointer changes; nothing reconnects. */
void smp_bridge_rebind(smp_bridge_t *b, const smp_config_t *cfg);
/* Frees after on_stopped. smp_bridge_free(NULL) is a no-op. */
void smp_bridge_free(smp_bridge_t *b);

/* A Sparkplug session (sparkplug.c) instead of the JSON one: its own client id, no P/G/status
 * messages, and a Will asked for before every CONNECT (Sparkplug's NDEATH carries a bdSeq
 * that changes with each one), sent with QoS 1, not retained. At a clean stop the Will's
 * payload is published (MQTT 3.1.1) or the broker is asked to publish the Will by a DISCONNECT
 * with reason 0x04 (MQTT 5). Call before smp_bridge_start; `s` is copied (client_id too). */
typedef struct smp_bridge_session {
    const char *client_id;
    /* Fills the Will for the next CONNECT; topic and payload stay the callee's and must live
     * until the next call or smp_bridge_free. */
    void (*will)(void *arg, const char **topic, const void **payload, size_t *len);
    void *arg;
} smp_bridge_session_t;
int smp_bridge_set_session(smp_bridge_t *b, const smp_bridge_session_t *s);
/* Ends the current connection without a DISCONNECT, so the broker publishes the Will, and
 * reconnects after the backoff, which keeps growing across such drops (Sparkplug: a primary
 * host went offline). Takes effect when the current callback returns, or within 500 ms. */
void smp_bridge_drop(smp_bridge_t *b, const char *reason);

/* Builds P/G/status payloads: {"state":"online","version":"1.0.0","ts":...}. */
#define SMP_VERSION "1.1.0"

#endif
