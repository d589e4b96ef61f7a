/* simpul --probe DEVICE: read every tag of one configured device once and print a table (see
 * docs/modbus.md, "Probe"). */
#ifndef SMP_PROBE_H
#define SMP_PROBE_H

#include <stdio.h>

/* Loads config_path (plugins from plugin_dir, or the config's/default search path when NULL),
 * reads every tag of `device` once through its driver and prints the table to out; problems go
 * to stderr. Never writes to the device. Returns the exit status: 0 every tag read, 3 the
 * device answered but some tags failed, 1 the device cannot be reached, 2 a bad config or no
 * such device. */
int smp_probe_run(const char *config_path, const char *plugin_dir, const char *device, FILE *out);

#endif
