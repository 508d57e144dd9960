// Manual pages, generated from what the program itself knows, so they cannot drift from it:
// brokerproxy(1) from the subcommands' help (the CLI11 app), brokerproxy.ini(5) from the option
// table (cli/options.h). `brokerproxy config --man 1|5` prints them; the build installs both.
//
// Output is man(7) roff: text is escaped (backslashes, leading dots and quotes, hyphens in
// option names), so any help text renders as written.

#ifndef BROKERPROXY_CLI_MANPAGE_H_
#define BROKERPROXY_CLI_MANPAGE_H_

#include <CLI/CLI.hpp>
#include <string>
#include <string_view>

namespace brokerproxy::cli {

// brokerproxy(1): every subcommand with its description, arguments and flags.
std::string ManPageCommands(const CLI::App& app, std::string_view version);
// brokerproxy.ini(5): every option with its section, default, flag and meaning.
std::string ManPageConfig(std::string_view version);

// `text` as roff body text.
std::string RoffEscape(std::string_view text);

}  // namespace brokerproxy::cli

#endif  // BROKERPROXY_CLI_MANPAGE_H_
