#include "loop/log.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

namespace brokerproxy {
namespace {

std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};
std::atomic<int> g_format{static_cast<int>(LogFormat::kText)};
std::atomic<bool> g_journal{false};

const char* LevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarn:
      return "warn";
    case LogLevel::kError:
      return "error";
  }
  return "?";
}

}  // namespace

void SetLogLevel(LogLevel level) { g_level.store(static_cast<int>(level)); }
LogLevel GetLogLevel() { return static_cast<LogLevel>(g_level.load(std::memory_order_relaxed)); }

std::optional<LogLevel> ParseLogLevel(std::string_view name) {
  for (LogLevel l : {LogLevel::kDebug, LogLevel::kInfo, LogLevel::kWarn, LogLevel::kError}) {
    if (name == LevelName(l)) return l;
  }
  if (name == "warning") return LogLevel::kWarn;
  return std::nullopt;
}

std::string LogSafe(std::string_view text, size_t max_bytes) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  size_t shown = text.size() < max_bytes ? text.size() : max_bytes;
  out.reserve(shown + 3);
  for (size_t i = 0; i < shown; ++i) {
    auto c = static_cast<unsigned char>(text[i]);
    if (c > ' ' && c < 0x7f && c != '\\') {
      out.push_back(static_cast<char>(c));
    } else {
      out += "\\x";
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 0xf]);
    }
  }
  if (shown < text.size()) out += "...";
  return out;
}

namespace {

// sd-daemon(3) priorities: debug 7, info 6, warning 4, error 3.
char Priority(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return '7';
    case LogLevel::kInfo:
      return '6';
    case LogLevel::kWarn:
      return '4';
    case LogLevel::kError:
      return '3';
  }
  return '6';
}

std::string Timestamp() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  tm utc{};
  gmtime_r(&ts.tv_sec, &utc);
  char buf[96];  // the compiler sizes every field at its widest
  std::snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", utc.tm_year + 1900,
                utc.tm_mon + 1, utc.tm_mday, utc.tm_hour, utc.tm_min, utc.tm_sec,
                ts.tv_nsec / 1000000);
  return buf;
}

void AppendJsonString(std::string_view text, std::string* out) {
  static constexpr char kHex[] = "0123456789abcdef";
  out->push_back('"');
  for (char ch : text) {
    auto c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      out->push_back('\\');
      out->push_back(ch);
    } else if (c < 0x20 || c == 0x7f) {
      *out += "\\u00";
      out->push_back(kHex[c >> 4]);
      out->push_back(kHex[c & 0xf]);
    } else {
      out->push_back(ch);  // UTF-8 passes through; peer text was made ASCII by LogSafe
    }
  }
  out->push_back('"');
}

bool IsKey(std::string_view key) {
  if (key.empty() || key.size() > 32) return false;
  for (char c : key) {
    if (!((c >= 'a' && c <= 'z') || c == '_')) return false;
  }
  // Fields of the object itself cannot be overwritten by a word of the message.
  return key != "time" && key != "level" && key != "message";
}

bool AllDigits(std::string_view v) {
  if (v.empty() || v.size() > 18) return false;
  for (char c : v) {
    if (c < '0' || c > '9') return false;
  }
  return true;
}

// The "key=value" words of `message` as JSON members (",\"key\":value"), each key once.
void AppendFields(std::string_view message, std::string* out) {
  std::string seen = " ";
  size_t i = 0;
  while (i < message.size()) {
    size_t end = message.find(' ', i);
    if (end == std::string_view::npos) end = message.size();
    std::string_view word = message.substr(i, end - i);
    size_t eq = word.find('=');
    if (eq != std::string_view::npos && IsKey(word.substr(0, eq)) &&
        seen.find(" " + std::string(word.substr(0, eq)) + " ") == std::string::npos) {
      std::string_view key = word.substr(0, eq);
      std::string_view value = word.substr(eq + 1);
      if (key == "reason") {
        value = message.substr(i + eq + 1);
        end = message.size();
      }
      seen += std::string(key) + " ";
      out->push_back(',');
      AppendJsonString(key, out);
      out->push_back(':');
      if (AllDigits(value)) {
        out->append(value);
      } else {
        AppendJsonString(value, out);
      }
    }
    i = end + 1;
  }
}

}  // namespace

void SetLogFormat(LogFormat format) { g_format.store(static_cast<int>(format)); }

std::optional<LogFormat> ParseLogFormat(std::string_view name) {
  if (name == "text") return LogFormat::kText;
  if (name == "json") return LogFormat::kJson;
  return std::nullopt;
}

void SetLogToJournal(bool journal) { g_journal.store(journal); }

bool StderrIsJournal() {
  const char* stream = std::getenv("JOURNAL_STREAM");
  if (stream == nullptr) return false;
  unsigned long long dev = 0, ino = 0;
  if (std::sscanf(stream, "%llu:%llu", &dev, &ino) != 2) return false;
  struct stat st {};
  if (::fstat(STDERR_FILENO, &st) != 0) return false;
  return static_cast<unsigned long long>(st.st_dev) == dev &&
         static_cast<unsigned long long>(st.st_ino) == ino;
}

std::string FormatLogLine(LogLevel level, std::string_view message) {
  bool journal = g_journal.load(std::memory_order_relaxed);
  std::string out;
  out.reserve(message.size() + 64);
  if (journal) {
    out += '<';
    out += Priority(level);
    out += '>';
  }
  if (static_cast<LogFormat>(g_format.load(std::memory_order_relaxed)) == LogFormat::kJson) {
    out += '{';
    if (!journal) out += "\"time\":\"" + Timestamp() + "\",";
    out += "\"level\":\"";
    out += LevelName(level);
    out += "\",\"message\":";
    AppendJsonString(message, &out);
    AppendFields(message, &out);
    out += '}';
    return out;
  }
  if (!journal) out += Timestamp() + " ";
  char name[8];
  std::snprintf(name, sizeof(name), "%-5s ", LevelName(level));
  out += name;
  out.append(message);
  return out;
}

void Logf(LogLevel level, const char* fmt, ...) {
  char message[2048];
  va_list ap;
  va_start(ap, fmt);
  int m = std::vsnprintf(message, sizeof(message), fmt, ap);
  va_end(ap);
  size_t len = m < 0 ? 0 : std::min(static_cast<size_t>(m), sizeof(message) - 1);
  std::string line = FormatLogLine(level, std::string_view(message, len));
  line.push_back('\n');
  // One write per line so lines from the daemon and its children never interleave.
  ssize_t ignored = ::write(STDERR_FILENO, line.data(), line.size());
  (void)ignored;
}

}  // namespace brokerproxy
