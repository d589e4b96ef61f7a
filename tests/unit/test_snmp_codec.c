/* Unit tests of the SNMP driver's conversions (protocols/snmp/snmp.c, included to reach its
 * statics): OID parsing, varbind decoding for every SNMP type against every tag type, UTF-8
 * repair of OCTET STRINGs, SET encoding, and the config cross-field checks. The integration
 * test (test_snmp.py) covers what snmpd can serve; this covers what it cannot (IpAddress,
 * OBJECT IDENTIFIER, hostile byte strings). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "../../protocols/snmp/snmp.c"

/* ---- helpers ----------------------------------------------------------------------------- */

static sn_tag_t make_tag(smp_type_t type)
{
    sn_tag_t t;
    memset(&t, 0, sizeof t);
    t.name = "t";
    t.type = type;
    return t;
}

/* A varbind as net-snmp would hand it over, built with the library's own setter. */
static netsnmp_variable_list *vb_new(u_char type, const void *val, size_t len)
{
    static const oid name[] = {1, 3, 6, 1, 4, 1, 99999, 1, 0};
    netsnmp_variable_list *vb = calloc(1, sizeof *vb);
    assert_non_null(vb);
    snmp_set_var_objid(vb, name, OID_LENGTH(name));
    vb->type = type;
    if (val != NULL) {
        assert_int_equal(snmp_set_var_value(vb, val, len), 0);
    }
    return vb;
}

static smp_reading_t decode(sn_tag_t *t, netsnmp_variable_list *vb)
{
    smp_reading_t r;
    decode_var(t, vb, &r);
    snmp_free_var(vb);
    return r;
}

static netsnmp_variable_list *vb_long(u_char type, long x)
{
    return vb_new(type, &x, sizeof x);
}

/* ---- tests ------------------------------------------------------------------------------- */

static void test_oid_parse(void **state)
{
    (void)state;
    oid o[MAX_OID_LEN];
    assert_int_equal(oid_parse("1.3.6.1.2.1.33.1.2.4.0", o), 11);
    assert_int_equal(o[6], 33);
    assert_int_equal(oid_parse(".1.3.6.1.2.1.1.3.0", o), 9);
    assert_int_equal(oid_parse("1.3.4294967295", o), 3);
    assert_int_equal(o[2], 4294967295u);
    static const char *const bad[] = {
        "",      ".",     "1",       "1.",   "1..3", "1.3.",
        "a.b",   "1.3.x", "1.3.-1",  " 1.3", "1.3 ", "1.3.4294967296",
        "..1.3", "1,3",   "iso.3.6", NULL,
    };
    for (size_t i = 0; bad[i] != NULL; i++) {
        assert_int_equal(oid_parse(bad[i], o), 0);
    }
    assert_int_equal(oid_parse(NULL, o), 0);
    char longest[4 * MAX_OID_LEN + 8] = "1";
    for (int i = 1; i < MAX_OID_LEN; i++) {
        strcat(longest, ".1");
    }
    assert_int_equal(oid_parse(longest, o), MAX_OID_LEN);
    strcat(longest, ".1");
    assert_int_equal(oid_parse(longest, o), 0);
}

static void test_integer(void **state)
{
    (void)state;
    sn_tag_t t = make_tag(SMP_TYPE_INT32);
    smp_reading_t r = decode(&t, vb_long(ASN_INTEGER, -5));
    assert_int_equal(r.status, 0);
    assert_int_equal(r.value.v.i, -5);
    assert_int_equal(t.asn_type, ASN_INTEGER);
    t = make_tag(SMP_TYPE_INT64);
    r = decode(&t, vb_long(ASN_INTEGER, INT32_MIN));
    assert_int_equal(r.value.v.i, INT32_MIN);
    /* Unsigned tags take non-negative INTEGERs only. */
    t = make_tag(SMP_TYPE_UINT32);
    r = decode(&t, vb_long(ASN_INTEGER, 2147483647));
    assert_int_equal(r.status, 0);
    assert_int_equal(r.value.v.u, 2147483647u);
    r = decode(&t, vb_long(ASN_INTEGER, -1));
    assert_int_equal(r.status, -ERANGE);
    t = make_tag(SMP_TYPE_STRING);
    r = decode(&t, vb_long(ASN_INTEGER, 1));
    assert_int_equal(r.status, -EINVAL);
    assert_string_equal(r.message, "type mismatch: the agent returned INTEGER, the tag is string");
    assert_int_equal(t.asn_type, 0);
    free(t.str);
}

static void test_unsigned_types(void **state)
{
    (void)state;
    const u_char types[] = {ASN_COUNTER, ASN_GAUGE, ASN_TIMETICKS};
    for (size_t i = 0; i < sizeof types; i++) {
        sn_tag_t t = make_tag(SMP_TYPE_UINT32);
        smp_reading_t r = decode(&t, vb_long(types[i], 4000000000L));
        assert_int_equal(r.status, 0);
        assert_int_equal(r.value.v.u, 4000000000u);
        t = make_tag(SMP_TYPE_UINT64);
        r = decode(&t, vb_long(types[i], 7));
        assert_int_equal(r.value.v.u, 7);
        t = make_tag(SMP_TYPE_INT32); /* 4000000000 would not fit: refused whatever the value */
        r = decode(&t, vb_long(types[i], 7));
        assert_int_equal(r.status, -EINVAL);
        free(t.str);
    }
    struct counter64 c = {.high = 0x12345678, .low = 0x9abcdef0};
    sn_tag_t t = make_tag(SMP_TYPE_UINT64);
    smp_reading_t r = decode(&t, vb_new(ASN_COUNTER64, &c, sizeof c));
    assert_int_equal(r.status, 0);
    assert_true(r.value.v.u == 0x123456789abcdef0ull);
    t = make_tag(SMP_TYPE_UINT32); /* a Counter64 can exceed 32 bits */
    r = decode(&t, vb_new(ASN_COUNTER64, &c, sizeof c));
    assert_int_equal(r.status, -EINVAL);
    assert_string_equal(r.message,
                        "type mismatch: the agent returned Counter64, the tag is uint32");
    free(t.str);
}

static void test_strings_and_addresses(void **state)
{
    (void)state;
    sn_tag_t t = make_tag(SMP_TYPE_STRING);
    smp_reading_t r = decode(&t, vb_new(ASN_OCTET_STR, "hello", 5));
    assert_int_equal(r.status, 0);
    assert_int_equal(r.value.len, 5);
    assert_memory_equal(r.value.s, "hello", 5);
    r = decode(&t, vb_new(ASN_OCTET_STR, "", 0));
    assert_int_equal(r.status, 0);
    assert_int_equal(r.value.len, 0);
    const u_char ip[4] = {10, 0, 3, 7};
    r = decode(&t, vb_new(ASN_IPADDRESS, ip, 4));
    assert_int_equal(r.status, 0);
    assert_string_equal(r.value.s, "10.0.3.7");
    t.type = SMP_TYPE_UINT32;
    r = decode(&t, vb_new(ASN_IPADDRESS, ip, 4));
    assert_int_equal(r.status, -EINVAL);
    static const oid id[] = {1, 3, 6, 1};
    t.type = SMP_TYPE_STRING;
    r = decode(&t, vb_new(ASN_OBJECT_ID, id, sizeof id));
    assert_int_equal(r.status, -EINVAL);
    assert_string_equal(r.message,
                        "type mismatch: the agent returned OBJECT IDENTIFIER, the tag is string");
    free(t.str);
}

/* Every byte that does not start a valid UTF-8 sequence becomes U+FFFD. */
static void test_utf8_repair(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        size_t n;
        const char *out;
    } cases[] = {
        {"A\xff"
         "B",
         3,
         "A\xef\xbf\xbd"
         "B"},
        {"\xc3\xa9", 2, "\xc3\xa9"},                                 /* é */
        {"\xc0\xaf", 2, "\xef\xbf\xbd\xef\xbf\xbd"},                 /* overlong '/' */
        {"\xe0\x80\xaf", 3, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"}, /* overlong, 3 bytes */
        {"\xed\xa0\x80", 3, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"}, /* a surrogate */
        {"\xf4\x90\x80\x80", 4,
         "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"}, /* past U+10FFFF */
        {"\xf0\x9f\x98\x80", 4, "\xf0\x9f\x98\x80"},          /* an emoji */
        {"\xe2\x82", 2, "\xef\xbf\xbd\xef\xbf\xbd"},          /* truncated */
        {"a\0b", 3, "a\0b"},                                  /* NUL kept, length says */
    };
    sn_tag_t t = make_tag(SMP_TYPE_STRING);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        smp_value_t v;
        assert_int_equal(decode_string(&t, (const u_char *)cases[i].in, cases[i].n, &v), 0);
        size_t want = i == sizeof cases / sizeof cases[0] - 1 ? 3 : strlen(cases[i].out);
        assert_int_equal(v.len, want);
        assert_memory_equal(v.s, cases[i].out, want);
    }
    free(t.str);
}

static void test_exceptions_are_tag_errors(void **state)
{
    (void)state;
    sn_tag_t t = make_tag(SMP_TYPE_INT32);
    smp_reading_t r = decode(&t, vb_new(SNMP_NOSUCHINSTANCE, NULL, 0));
    assert_int_equal(r.status, SMP_EDEVICE);
    assert_string_equal(r.message, "noSuchInstance");
    r = decode(&t, vb_new(SNMP_ENDOFMIBVIEW, NULL, 0));
    assert_string_equal(r.message, "endOfMibView");
    assert_string_equal(error_name(SNMP_ERR_NOTWRITABLE), "notWritable");
    assert_string_equal(error_name(SNMP_ERR_AUTHORIZATIONERROR), "authorizationError");
    assert_string_equal(error_name(99), "unknown error-status");
}

static void test_set_encoding(void **state)
{
    (void)state;
    netsnmp_pdu *pdu = snmp_pdu_create(SNMP_MSG_SET);
    const char *m = NULL;
    sn_tag_t t = make_tag(SMP_TYPE_INT64);
    t.oid_len = oid_parse("1.3.6.1.4.1.99999.1.2.0", t.oid);
    t.asn_type = ASN_INTEGER;
    smp_value_t v = {.v.i = 3000000000LL};
    assert_int_equal(add_set_var(pdu, &t, &v, &m), -ERANGE);
    v.v.i = -7;
    assert_int_equal(add_set_var(pdu, &t, &v, &m), 0);
    assert_int_equal(*pdu->variables->val.integer, -7);
    t.type = SMP_TYPE_UINT32;
    v.v.u = 2147483648u;
    assert_int_equal(add_set_var(pdu, &t, &v, &m), -ERANGE);
    t.asn_type = ASN_GAUGE;
    assert_int_equal(add_set_var(pdu, &t, &v, &m), 0);
    v.v.u = 4294967296ull;
    assert_int_equal(add_set_var(pdu, &t, &v, &m), -ERANGE);
    t.type = SMP_TYPE_STRING;
    t.asn_type = ASN_IPADDRESS;
    smp_value_t s = {.s = "10.0.3.7", .len = 8};
    assert_int_equal(add_set_var(pdu, &t, &s, &m), 0);
    s.s = "10.0.3";
    s.len = 6;
    assert_int_equal(add_set_var(pdu, &t, &s, &m), -EINVAL);
    t.asn_type = ASN_OBJECT_ID;
    assert_int_equal(add_set_var(pdu, &t, &s, &m), -EINVAL);
    snmp_free_pdu(pdu);
}

/* check_connection's cross-field rules, through a recording report function. */
static int nreports;
static char last_key[64];

static void record(void *ctx, const char *key, const char *fmt, ...)
{
    (void)ctx, (void)fmt;
    nreports++;
    snprintf(last_key, sizeof last_key, "%s", key != NULL ? key : "(object)");
}

static void test_check_connection(void **state)
{
    (void)state;
    smp_param_t p[CK_COUNT];
    memset(p, 0, sizeof p);
    p[CK_HOST] = (smp_param_t){.set = true, .s = "10.0.3.7"};
    p[CK_VERSION] = (smp_param_t){.set = true, .i = V2C, .s = "2c"};
    assert_int_equal(check_connection(p, record, NULL), 0);
    p[CK_USER] = (smp_param_t){.set = true, .s = "u"};
    nreports = 0;
    assert_int_equal(check_connection(p, record, NULL), 1);
    assert_string_equal(last_key, "user");
    /* v3 authPriv (the default level) needs both password files of 8+ characters. */
    p[CK_VERSION] = (smp_param_t){.set = true, .i = V3, .s = "3"};
    p[CK_AUTH_PASSWORD] = (smp_param_t){.set = true, .s = "short"};
    nreports = 0;
    assert_int_equal(check_connection(p, record, NULL), 2);
    p[CK_AUTH_PASSWORD].s = "longenough";
    p[CK_PRIV_PASSWORD] = (smp_param_t){.set = true, .s = "longenough"};
    p[CK_COMMUNITY] = (smp_param_t){.set = true, .s = "public"};
    nreports = 0;
    assert_int_equal(check_connection(p, record, NULL), 1);
    assert_string_equal(last_key, "community");
    p[CK_COMMUNITY].set = false;
    assert_int_equal(check_connection(p, record, NULL), 0);
    /* noAuthNoPriv takes no password at all. */
    p[CK_SECURITY_LEVEL] = (smp_param_t){.set = true, .i = SEC_NOAUTH, .s = "noAuthNoPriv"};
    nreports = 0;
    assert_int_equal(check_connection(p, record, NULL), 2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_oid_parse),      cmocka_unit_test(test_integer),
        cmocka_unit_test(test_unsigned_types), cmocka_unit_test(test_strings_and_addresses),
        cmocka_unit_test(test_utf8_repair),    cmocka_unit_test(test_exceptions_are_tag_errors),
        cmocka_unit_test(test_set_encoding),   cmocka_unit_test(test_check_connection),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
