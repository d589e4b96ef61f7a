/* The CLI's view of the plugins: lists them, prints their keys, and generates the JSON Schema
 * of their config parts, all from the key tables the plugins declare (plugin.h). */
#ifndef SMP_PLUGIN_INFO_H
#define SMP_PLUGIN_INFO_H

#include <stdio.h>

/* --plugins: prints the search directories and every NAME.so found in them, with its version
 * and ABI, or why it cannot be used. Returns the number of unusable plugins, or -ENOMEM. */
int smp_plugin_list(FILE *f, const char *plugin_dir);
/* --plugin-help NAME: the connection and tag keys of protocol `name` (type, range or choices,
 * default, description). 0, or -ENOENT with the reason on `errs`. */
int smp_plugin_help(FILE *f, const char *plugin_dir, const char *name, FILE *errs);
/* --plugin-schema NAME: the same tables as JSON Schema fragments,
 * {"protocol", "version", "connection": {...}, "tag": {...}}. 0, -ENOENT or -EIO. */
int smp_plugin_schema(FILE *f, const char *plugin_dir, const char *name, FILE *errs);

#endif
