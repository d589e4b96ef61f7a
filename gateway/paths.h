/* paths: can the user running simpul keep its state where the config says?
 *
 * `--check` calls this after the config loaded: a config can be valid JSON with valid keys and
 * still name a data_dir the service user cannot create (a demo config copied to /etc), and the
 * gateway would then run without a durable store. */
#ifndef SMP_PATHS_H
#define SMP_PATHS_H

#include <stdio.h>

#include "config.h"

/* Checks that gateway.data_dir and the directory of store.path exist and are writable by this
 * process (or that the nearest existing parent is, so they can be created), and that an
 * existing store file is a readable and writable regular file. Prints each problem to `errs`
 * as "FILE:LINE:COL: path.to.key: message" (the key's position in cfg->path, 1:1 when the key
 * is absent) and returns the number of problems (0 when usable). Blocking (stat/access), for
 * the command line only. `cfg` is borrowed. */
int smp_paths_check(const smp_config_t *cfg, FILE *errs);

#endif
