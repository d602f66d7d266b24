// flexfed-owner: what a data owner runs on its own premises. Only parameters ever leave: see
// docs/OWNER_GUIDE.md for the workflow and how to check what an export holds.
#include <ATen/Parallel.h>

#include <cstdlib>
#include <iostream>
#include <thread>

#include "common/model/model.h"
#include "common/train/train_command.h"
#include "owner_client/commands.h"

namespace flexfed::owner {

void ExitOnError(const std::string& command, const absl::Status& status) {
  if (status.ok()) return;
  std::cerr << "flexfed-owner " << command << ": error: " << status.message() << "\n";
  std::exit(1);
}

}  // namespace flexfed::owner

int main(int argc, char** argv) {
  CLI::App app{"flexfed-owner: train your FlexOlmo expert on your own data; only parameters ever leave"};
  app.require_subcommand(1);
  app.footer("Exit codes: 0 success, 1 the command failed (the message says why and what to do), 2 bad usage,\n"
             "130/143 training stopped by SIGINT/SIGTERM after saving a checkpoint (continue with --resume).");
  flexfed::owner::AddRouterInitCommand(app);
  flexfed::AddTrainCommand(app, flexfed::TrainCommandKind::kOwner, flexfed::owner::ExitOnError);
  flexfed::owner::AddEvalCommand(app);
  flexfed::owner::AddAuditCommand(app);
  flexfed::owner::AddExportCommand(app);
  flexfed::owner::AddInspectCommand(app);
#ifdef FLEXFED_WITH_SERVICES
  flexfed::owner::AddNetworkCommands(app);
#endif
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  } catch (const std::exception& e) {
    std::cerr << "flexfed-owner: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
