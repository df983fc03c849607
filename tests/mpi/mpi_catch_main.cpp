// Catch2's main for the programs that run under mpirun: MPI starts before the
// tests and ends after them, and the job's verdict is the worst rank's (a
// rank that failed fails every rank's exit status).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "ctformer/train/mpi_communicator.hpp"

int main(int argc, char** argv) {
  ctformer::train::mpi_environment mpi(argc, argv);
  int result = Catch::Session().run(argc, argv);
  const ctformer::train::mpi_communicator world;
  if (world.size() > 1) {
    int worst = result;
    MPI_Allreduce(&result, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    result = worst;
  }
  return result;
}
