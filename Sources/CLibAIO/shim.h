#ifndef VD_CLIBAIO_SHIM_H
#define VD_CLIBAIO_SHIM_H
#include <fcntl.h>
#include <sys/types.h>
#include <libaio.h>

/* Swift's Glibc module does not export O_DIRECT, fallocate or copy_file_range (both need _GNU_SOURCE, which would make this module's
   view of the system headers differ from Glibc's). glibc defines __O_DIRECT unconditionally. */
static const int vd_o_direct = __O_DIRECT;
extern int fallocate(int fd, int mode, off_t offset, off_t len);
extern ssize_t copy_file_range(int infd, off_t *pinoff, int outfd, off_t *poutoff, size_t length, unsigned int flags);
#endif
