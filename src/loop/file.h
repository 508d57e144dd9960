// Files replaced atomically: the one writer of every file brokerproxy keeps (the registry, the
// CA and its key, a job's key and certificate, the laptop's known_cas pins).
//
// WriteFileAtomic(path, data, mode):
//   1. creates a new file in path's directory under a fresh random name (<path>.tmp-<hex>) with
//      O_CREAT|O_EXCL|O_NOFOLLOW and `mode` from the start, then sets `mode` exactly (fchmod, as
//      open() applied the umask): a key is never readable by others for even a moment, and no
//      file or symlink that someone planted under the temp name is opened or followed;
//   2. writes all of `data` (a short write is retried, a write of nothing is an error), fsync;
//   3. renames it over `path`, then fsyncs the directory, so the new content survives a crash
//      once the call returned OK;
//   4. on every failure before the rename, removes the temp file: `path` keeps its old content
//      and nothing is left behind (a crash can leave a <path>.tmp-* file, never a half `path`).
// Concurrent writers of one path (two `connect` processes pinning a CA) each rename their own
// complete file: the last rename wins, and no reader sees a mix. The error names the file and
// the step that failed. Blocks on the disk: the daemon calls it on the thread pool.

#ifndef BROKERPROXY_LOOP_FILE_H_
#define BROKERPROXY_LOOP_FILE_H_

#include <sys/types.h>

#include <string>
#include <string_view>

#include "loop/status.h"

namespace brokerproxy::loop {

Status WriteFileAtomic(const std::string& path, std::string_view data, mode_t mode);

namespace internal {
// WriteFileAtomic through the temp name `tmp` (steps 1-4 once, no retry); for tests that plant
// something at the temp name. Whatever is found at `tmp` is refused and left alone.
Status WriteFileAtomicVia(const std::string& path, const std::string& tmp, std::string_view data,
                          mode_t mode);
}  // namespace internal

}  // namespace brokerproxy::loop

#endif  // BROKERPROXY_LOOP_FILE_H_
