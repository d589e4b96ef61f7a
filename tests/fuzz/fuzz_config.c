/* libFuzzer: the config loader on arbitrary text. Every input gets a verdict; none crashes,
 * leaks or reads out of bounds. Plugins load from SMP_FUZZ_PLUGIN_DIR (default: the build
 * tree), so protocol keys are checked against the real Modbus driver.
 *   meson setup build-fuzz -Dfuzz=true -Db_sanitize=address,undefined (CC=clang)
 *   build-fuzz/tests/fuzz/fuzz_config -max_total_time=60 tests/fuzz/corpus/fuzz_config \
 *     tests/integration/configs   (new inputs go to the first folder only) */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    FILE *devnull = fopen("/dev/null", "w");
    smp_config_t *cfg = NULL;
    const char *dir = getenv("SMP_FUZZ_PLUGIN_DIR");
    int n = smp_config_load_text("fuzz.json", (const char *)data, size,
                                 dir ? dir : SMP_PLUGIN_BUILD_DIR, devnull, &cfg);
    if (n == 0 && cfg == NULL) {
        abort(); /* "valid" must come with a config */
    }
    smp_config_free(cfg);
    fclose(devnull);
    return 0;
}
