#include "cli/manpage.h"

#include <string>

#include "cli/options.h"

namespace brokerproxy::cli {
namespace {

// The .TH line: name, section, no date (a reproducible build), source, manual.
std::string Header(std::string_view name, int section, std::string_view version) {
  return ".TH " + std::string(name) + " " + std::to_string(section) + " \"\" \"brokerproxy " +
         RoffEscape(version) + "\" \"brokerproxy manual\"\n";
}

// An option or flag name: bold, every hyphen a real minus (so it can be searched and copied).
std::string Bold(std::string_view name) { return "\\fB" + RoffEscape(name) + "\\fR"; }

// Paragraph text; a leading period or apostrophe would be read as a request.
std::string Para(std::string_view text) {
  std::string out = RoffEscape(text);
  if (!out.empty() && (out[0] == '.' || out[0] == '\'')) out.insert(0, "\\&");
  return out + "\n";
}

}  // namespace

std::string RoffEscape(std::string_view text) {
  std::string out;
  out.reserve(text.size() + 8);
  bool line_start = true;
  for (char c : text) {
    if (c == '\\') {
      out += "\\e";
    } else if (c == '-') {
      out += "\\-";
    } else if (line_start && (c == '.' || c == '\'')) {
      out += "\\&";
      out += c;
    } else {
      out += c;
    }
    line_start = c == '\n';
  }
  return out;
}

std::string ManPageCommands(const CLI::App& app, std::string_view version) {
  std::string out = Header("BROKERPROXY", 1, version);
  out += ".SH NAME\nbrokerproxy \\- " +
         Para(app.get_description().substr(app.get_description().find(": ") == std::string::npos
                                               ? 0
                                               : app.get_description().find(": ") + 2));
  out += ".SH SYNOPSIS\n.B brokerproxy\n.I command\n[\\fIoptions\\fR]\n";
  out += ".SH DESCRIPTION\n";
  out += Para(
      "One daemon on a cluster's login node (brokerproxy run) keeps a registry of services "
      "running inside batch jobs and serves a multiplexing proxy on one port; job scripts "
      "register their services (save), and users reach them from their laptops (connect, or "
      "any client through an SSH tunnel). Every command reads the configuration described in "
      "brokerproxy.ini(5).");
  out += ".SH COMMANDS\n";
  for (const CLI::App* sub : app.get_subcommands({})) {
    if (sub->get_group().empty()) continue;  // hidden
    out += ".SS " + Bold(sub->get_name()) + "\n" + Para(sub->get_description());
    for (const CLI::Option* opt : sub->get_options()) {
      std::string names = opt->get_name(/*positional=*/false, /*all_options=*/true);
      if (names.empty() || names == "--help,-h" || names == "-h,--help") continue;
      out += ".TP\n";
      if (opt->get_positional()) {
        out += "\\fI" + RoffEscape(opt->get_name(true, false)) + "\\fR";
      } else {
        std::string shown;
        size_t start = 0;
        while (start <= names.size()) {
          size_t comma = names.find(',', start);
          std::string one = names.substr(start, comma - start);
          shown += (shown.empty() ? "" : ", ") + Bold(one);
          if (comma == std::string::npos) break;
          start = comma + 1;
        }
        out += shown;
        if (opt->get_type_size() != 0) out += " \\fI" + RoffEscape(opt->get_type_name()) + "\\fR";
      }
      out +=
          "\n" + Para(opt->get_description().empty() ? "(no description)" : opt->get_description());
    }
  }
  out += ".SH ENVIRONMENT\n";
  out += ".TP\n.B BROKERPROXY_CONFIG\n" +
         Para("The configuration file when -c is not given (else /etc/brokerproxy/config.ini).");
  out += ".TP\n.B SLURM_JOB_ID\\fR, \\fBPBS_JOBID\n" +
         Para("The job id that save and the other job commands default to.");
  out += ".TP\n.B NOTIFY_SOCKET\\fR, \\fBWATCHDOG_USEC\n" +
         Para(
             "Set by systemd for a Type=notify service: run reports readiness, its status and "
             "watchdog pings there.");
  out += ".SH FILES\n.TP\n.I /etc/brokerproxy/config.ini\n" +
         Para("The site's configuration (brokerproxy.ini(5)).");
  out += ".TP\n.I /var/lib/brokerproxy\n" +
         Para("The daemon's state: registry.json, the TLS CA and the SSH host key.");
  out += ".TP\n.I /run/brokerproxy/control.sock\n" +
         Para("The control socket of the packaged service.");
  out += ".SH SEE ALSO\n.BR brokerproxy.ini (5),\n.BR systemd.service (5)\n";
  return out;
}

std::string ManPageConfig(std::string_view version) {
  std::string out = Header("BROKERPROXY.INI", 5, version);
  out += ".SH NAME\nbrokerproxy.ini \\- configuration of brokerproxy\n";
  out += ".SH SYNOPSIS\n.I /etc/brokerproxy/config.ini\n";
  out += ".SH DESCRIPTION\n";
  out += Para(
      "Every brokerproxy command reads one configuration file: -c FILE, else "
      "$BROKERPROXY_CONFIG, else /etc/brokerproxy/config.ini if it exists. Precedence, lowest "
      "first: built-in defaults; the file; --set section.key=value on the command line; "
      "dedicated flags such as run --listen.");
  out += ".PP\n" +
         Para(
             "Syntax: [section] headers, key = value lines, and comment lines that start with # "
             "or a semicolon; a # after a value is part of the value. Double quotes keep blanks "
             "around a value. Durations take a unit: 250ms, 30s, 5m, 2h, 1d; a bare number "
             "means seconds. List options take comma-separated values and may be repeated; the "
             "first occurrence replaces the default list.");
  std::string_view section;
  for (const OptionSpec& spec : OptionTable()) {
    if (section != spec.section) {
      section = spec.section;
      out += ".SH [" + RoffEscape(section) + "]\n";
    }
    out += ".TP\n" + Bold(spec.key) + " = \\fI" +
           RoffEscape(*spec.default_text ? spec.default_text : "(empty)") + "\\fR\n";
    out += Para(spec.help);
    if (spec.flag != nullptr) {
      out += ".br\nFlag: " + Bold(spec.flag) + " (" + RoffEscape(ScopeText(spec.scope)) + ").\n";
    }
  }
  out += ".SH SEE ALSO\n.BR brokerproxy (1)\n";
  return out;
}

}  // namespace brokerproxy::cli
