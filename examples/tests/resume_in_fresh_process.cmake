# Runs train_gpt 20 steps straight, and the same 20-step plan stopped after 10 steps + save + resume in a new
# process + 10 steps; the two final checkpoints must be byte-identical
# (parameters, optimizer state, step and RNG). Invoked by ctest with
# -DTRAIN_GPT=<program> -DWORK_DIR=<scratch folder>.
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
set(common --steps 20 --eval-every 0 --threads 2 --quiet --batch-size 16)
macro(run)
  execute_process(COMMAND ${TRAIN_GPT} ${ARGN} RESULT_VARIABLE result OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "train_gpt ${ARGN} failed (${result}):\n${out}\n${err}")
  endif()
endmacro()
run(${common} --save ${WORK_DIR}/straight.safetensors)
run(${common} --stop-after 10 --save ${WORK_DIR}/half.safetensors)
run(${common} --resume ${WORK_DIR}/half.safetensors --save ${WORK_DIR}/resumed.safetensors)
execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files ${WORK_DIR}/straight.safetensors
                        ${WORK_DIR}/resumed.safetensors RESULT_VARIABLE different)
if(different)
  message(FATAL_ERROR "the resumed run's checkpoint differs from the uninterrupted run's")
endif()
message(STATUS "resumed checkpoint is byte-identical to the uninterrupted run")
