// flexfedctl: the operator's command line. Subcommands are listed by `flexfedctl --help`;
// docs/CLI.md describes each one and the exit codes.
#include <CLI/CLI.hpp>

#include <exception>
#include <iostream>

#include "ctl/inference_commands.h"
#include "ctl/logits_command.h"
#include "ctl/random_checkpoint_command.h"
#include "ctl/tokenize_command.h"
#include "common/train/train_command.h"
#ifdef FLEXFED_WITH_SERVICES
#include "ctl/admin_commands.h"
#include "ctl/release_commands.h"
#endif

int main(int argc, char** argv) {
  CLI::App app{"flexfedctl: operate a FlexFed coordinator and run FlexOlmo models locally"};
  app.require_subcommand(1);
  app.footer("Exit codes: 0 success, 1 the command failed (the message says why and what to do), 2 bad usage.");
  flexfed::cli::AddLogitsCommand(app);
  flexfed::cli::AddTokenizeCommand(app);
  flexfed::cli::AddRandomCheckpointCommand(app);
  flexfed::cli::AddInferenceCommands(app);
  flexfed::AddTrainCommand(app, flexfed::TrainCommandKind::kRouterTuning, flexfed::cli::ExitOnError);
#ifdef FLEXFED_WITH_SERVICES
  flexfed::cli::AddAdminCommands(app);
  flexfed::cli::AddReleaseCommands(app);
#endif
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);  // prints help or the usage error
    return code == 0 ? 0 : 2;
  } catch (const std::exception& e) {
    std::cerr << "flexfedctl: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
