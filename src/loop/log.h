// Logging to stderr: one line per event, "2026-11-26T03:37:35.123Z level message".
//
// Two more forms, chosen once at start:
//   - JSON (log_format = json): one object per line, {"time": ..., "level": ..., "message": ...}
//     plus a field for every "key=value" word of the message (a value of digits is a number;
//     `reason=` takes the rest of the line, since reasons come last and may hold spaces);
//   - the journal (stderr is systemd's journal stream, $JOURNAL_STREAM): no timestamp of ours,
//     since journald stamps every line, and a "<N>" priority prefix (sd-daemon(3)) so that
//     `journalctl -p warning` works. Both combine: JSON objects, without "time".
//
// printf-style so call sites stay short; the level check happens before any formatting, so a
// disabled debug line costs one comparison. Secrets must never be passed to these functions.
//
// Thread safety: safe from any thread (each line is one write(2)).

#ifndef BROKERPROXY_LOOP_LOG_H_
#define BROKERPROXY_LOOP_LOG_H_

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

namespace brokerproxy {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

// Default: kInfo.
void SetLogLevel(LogLevel level);
LogLevel GetLogLevel();
inline bool LogEnabled(LogLevel level) { return level >= GetLogLevel(); }
std::optional<LogLevel> ParseLogLevel(std::string_view name);

enum class LogFormat { kText, kJson };
// Default: kText, with timestamps.
void SetLogFormat(LogFormat format);
std::optional<LogFormat> ParseLogFormat(std::string_view name);
// Lines go to the journal: priority prefixes, no timestamps (see the top of this file).
void SetLogToJournal(bool journal);
// True if stderr is the stream $JOURNAL_STREAM names (device:inode), i.e. systemd connected it
// to the journal.
bool StderrIsJournal();

void Logf(LogLevel level, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
// The line Logf writes for `message` (without the newline), in the current form; for tests.
std::string FormatLogLine(LogLevel level, std::string_view message);

// `text` from a peer (an SSH user name, a server name, a channel destination, ...) made safe to
// log: bytes outside '!'..'~', and the backslash, become \xHH, so such text can neither end a
// line nor contain a space (a peer cannot forge a line, or a "throttling <HOST>:" phrase, that
// a log reader such as fail2ban would match). At most `max_bytes` of the input are shown; a
// longer input ends with "...". Every string a peer chose goes through this before a log call.
std::string LogSafe(std::string_view text, size_t max_bytes = 64);

}  // namespace brokerproxy

#define BP_LOG(level, ...)                     \
  do {                                         \
    if (::brokerproxy::LogEnabled(level)) {    \
      ::brokerproxy::Logf(level, __VA_ARGS__); \
    }                                          \
  } while (0)
#define LOG_DEBUG(...) BP_LOG(::brokerproxy::LogLevel::kDebug, __VA_ARGS__)
#define LOG_INFO(...) BP_LOG(::brokerproxy::LogLevel::kInfo, __VA_ARGS__)
#define LOG_WARN(...) BP_LOG(::brokerproxy::LogLevel::kWarn, __VA_ARGS__)
#define LOG_ERROR(...) BP_LOG(::brokerproxy::LogLevel::kError, __VA_ARGS__)

#endif  // BROKERPROXY_LOOP_LOG_H_
